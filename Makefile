# One command on a fresh machine: `make test` builds .venv and runs the default test suite.
# torch==2.13.0 goes in first: on this kind of machine it is the CPU wheel on local disk, and any
# other torch request (also one made by a dependency) pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= dev

.PHONY: install test test-slow bench tokenizer clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

test: install
	$(PY) -m pytest -q tests

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
