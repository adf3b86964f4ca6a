"""A tiny but complete run folder (the docs/design.md contract) for the hub_upload tests: a random-init MLLM
with its processor in `mllm/`, a `report.json` with metrics/settings/wall times/versions, a
`samples.png`, and optionally a PEFT LoRA adapter."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import transformers
from utils_mllm import tiny_mllm

REPORT = {
    "run": "tiny-test",
    "metrics": {
        "stage1": {"psnr": 21.734, "codebook_usage": 0.8125},
        "stage2": {"vqa_accuracy": 0.4219, "scene_match": 0.3333, "fid": 87.5},
    },
    "settings": {
        "preset": "tiny",
        "quantizer": "rq",
        "paradigm": "iterative",
        "text_model": {"source": "stage0"},
        "datasets": ["shapes-world"],
    },
    "wall_times": {"stage1": 12.5, "stage2": 30.25},
    "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
}


def write_tiny_run(path, *, quantizer: str = "rq", seed: int = 0, adapter: bool = False, report: dict | None = None):
    """Write a run folder at `path`; returns (path, model, processor)."""
    path = Path(path)
    model, processor = tiny_mllm(quantizer, seed=seed)
    model.save_pretrained(path / "mllm")
    processor.save_pretrained(path / "mllm")
    (path / "report.json").write_text(json.dumps(report or REPORT, indent=2))
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 64, 3), dtype=np.uint8)
    PIL.Image.fromarray(pixels).save(path / "samples.png")
    if adapter:
        from peft import LoraConfig, get_peft_model

        lora = get_peft_model(
            tiny_mllm(quantizer, seed=seed)[0], LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
        )
        lora.save_pretrained(path / "adapter")
    return path, model, processor


REPO_ROOT = Path(__file__).resolve().parent.parent
PROBE = Path(__file__).resolve().parent / "remote_code_probe.py"


def clean_env(home: Path, **extra) -> dict:
    """Environment of a clean interpreter: its own HF cache and module cache, no PYTHONPATH."""
    import os

    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("PYTHONPATH", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT")
    }
    env.update(
        HF_HOME=str(home / "hf_home"),
        HF_MODULES_CACHE=str(home / "modules"),
        OMP_NUM_THREADS="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        TOKENIZERS_PARALLELISM="false",
    )
    env.update(extra)
    return env


def run_probe(source: str, image_path: Path, workdir: Path, env: dict, *options: str) -> dict:
    """Load `source` in a clean interpreter (`python -I`, cwd outside the repository, this repository's
    packages blocked) through remote code only; returns its outputs."""
    import shutil
    import subprocess
    import sys

    workdir.mkdir(parents=True, exist_ok=True)
    assert REPO_ROOT not in workdir.resolve().parents
    script = workdir / PROBE.name
    shutil.copyfile(PROBE, script)
    done = subprocess.run(
        [sys.executable, "-I", str(script), source, str(image_path), *options],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def reference_outputs(model, processor, image) -> dict:
    """The probe's outputs computed on the original in-process model (and its standalone tokenizer)."""
    from remote_code_probe import outputs

    from hub_upload.export import standalone_visual_tokenizer

    return outputs(model, processor, model.model, standalone_visual_tokenizer(model), image)
