"""Nothing is lost: a write that fails halfway leaves the previous folder or file whole and no temporary behind."""

import pytest
from PIL import Image

from training.checkpointing import (
    atomic_directory,
    atomic_save_image,
    atomic_write_json,
    atomic_write_text,
    is_complete,
)


class Interrupted(Exception):
    pass


def test_a_failed_folder_write_keeps_the_previous_folder(tmp_path):
    target = tmp_path / "model"
    with atomic_directory(target) as staging:
        (staging / "weights").write_text("first")
    assert is_complete(target) and (target / "weights").read_text() == "first"
    with pytest.raises(Interrupted):
        with atomic_directory(target) as staging:
            (staging / "weights").write_text("half of the second")
            raise Interrupted
    assert (target / "weights").read_text() == "first" and is_complete(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_failed_text_write_keeps_the_previous_text(tmp_path, monkeypatch):
    path = atomic_write_text(tmp_path / "report.json", '{"psnr": 30.6}')

    def cut_short(self, text, *args, **kwargs):
        open(self, "w").write(text[:3])
        raise Interrupted

    monkeypatch.setattr(type(path), "write_text", cut_short)
    with pytest.raises(Interrupted):
        atomic_write_text(path, '{"psnr": 31.0}')
    monkeypatch.undo()
    assert path.read_text() == '{"psnr": 30.6}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_a_failed_image_save_keeps_the_previous_png(tmp_path):
    path = atomic_save_image(Image.new("RGB", (4, 4), (255, 0, 0)), tmp_path / "samples.png")
    assert path.read_bytes().startswith(b"\x89PNG")

    class FailsHalfway:
        def save(self, target, format=None):
            open(target, "wb").write(b"\x89PNG\r\n\x1a\n half")
            raise Interrupted

    with pytest.raises(Interrupted):
        atomic_save_image(FailsHalfway(), path)
    assert Image.open(path).getpixel((0, 0)) == (255, 0, 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.png"]


def test_json_reports_take_numpy_and_torch_scalars_and_paths_and_refuse_the_rest(tmp_path):
    import json
    from pathlib import Path

    import numpy as np
    import torch

    path = atomic_write_json(
        tmp_path / "metrics.json",
        {"psnr": np.float32(30.5), "steps": np.int64(3), "loss": torch.tensor(0.25), "run": Path("outputs/demo")},
    )
    assert json.loads(path.read_text()) == {"psnr": 30.5, "steps": 3, "loss": 0.25, "run": "outputs/demo"}
    with pytest.raises(TypeError, match="ndarray is not JSON serialisable"):
        atomic_write_json(path, {"codes": np.zeros(3)})
    assert json.loads(path.read_text())["steps"] == 3  # the failed write left the previous file
