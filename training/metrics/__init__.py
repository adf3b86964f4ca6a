"""Evaluation metrics as local `evaluate` modules, loaded by path (no network).

    from training.metrics import load_metric
    load_metric("vqa_accuracy").compute(predictions=[...], references=[...], question_types=[...])

Each metric lives in ``training/metrics/<name>/<name>.py``. ``scene_match`` imports
``training.data`` (the scene parser); ``fid`` needs the optional extra
``pip install 'unicode-mllm[fid]'``.
"""

from __future__ import annotations

from pathlib import Path

import evaluate

METRICS_DIR = Path(__file__).resolve().parent
METRIC_NAMES = ("vqa_accuracy", "scene_match", "psnr", "ssim", "codebook_usage", "fid")


def metric_path(name: str) -> Path:
    if name not in METRIC_NAMES:
        raise ValueError(f"metric name must be one of {METRIC_NAMES}, got {name!r}")
    return METRICS_DIR / name


def load_metric(name: str, **kwargs):
    """`evaluate.load` on the metric's folder: a local path, so nothing is downloaded."""
    return evaluate.load(str(metric_path(name)), **kwargs)
