# One command on a fresh machine: `make test` builds .venv and runs the default test suite.
# torch==2.13.0 goes in first: on this kind of machine it is the CPU wheel on local disk, and any
# other torch request (also one made by a dependency) pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= dev

.PHONY: install demo ablate test lint format test-slow bench tokenizer clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

# The main job: the tiny preset end to end (stage 0 -> I -> codes -> decompress -> SFT -> evaluation), offline,
# <= 10 minutes on 2 CPU cores; writes outputs/demo-tiny/{report.json,report.md,samples.png,mllm/}. Re-running reuses
# finished stages.
demo: install
	$(VENV)/bin/unicode-mllm demo --preset tiny --output outputs/demo-tiny

# The paper's ablations at small scale (docs/results.md has its wall time): outputs/ablate/ablation.{md,json}.
ablate: install
	$(VENV)/bin/unicode-mllm ablate --preset tiny --output outputs/ablate

# The style check first (ruff.toml: line length 119, import order, pyflakes), then the default suite.
test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q tests

lint: install
	$(VENV)/bin/ruff check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test-slow: install
	$(PY) -m pytest -q -m slow tests

# Stage 0 + stage I of the tiny preset on the Shapes world; re-running reuses finished work.
tokenizer: install
	$(VENV)/bin/unicode-mllm train-text --preset tiny --output outputs/tiny
	$(VENV)/bin/unicode-mllm train-tokenizer --preset tiny --output outputs/tiny --resume

bench: install
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) benchmarks/quantizer.py
	$(PY) benchmarks/generation.py

clean:
	rm -rf $(VENV) build *.egg-info
