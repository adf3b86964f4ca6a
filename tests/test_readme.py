"""The README's Python API block, run verbatim on a model built at reduced size."""

import re
from pathlib import Path

import numpy as np
import PIL.Image
from hub_fixtures import write_tiny_run

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_python_api() -> str:
    section = README.read_text().split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_python_api_runs_verbatim(tmp_path, monkeypatch):
    _, model, _ = write_tiny_run(tmp_path / "outputs" / "demo-tiny")
    pixels = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    PIL.Image.fromarray(pixels).save(tmp_path / "my_scene.png")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(readme_python_api(), str(README), "exec"), namespace)
    assert isinstance(namespace["answer"], str)
    size = model.config.vq_config.image_size
    assert isinstance(namespace["image"], PIL.Image.Image) and namespace["image"].size == (size, size)
    written = namespace["sequences"][0, namespace["inputs"]["input_ids"].shape[1] :]
    assert len(written) == model.config.image_tokens_per_generation + 2  # <boi>, the codes, <eoi>
