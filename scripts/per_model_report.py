"""The command line shared by the scripts that measure one trained MLLM folder at a time and print a dict per model."""

import argparse
import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.data.shapes import example_rng, render_scene, sample_scene  # noqa: E402
from training.stage1 import images_to_uint8, to_pixel_values  # noqa: E402


def run_over_models(description: str, measure: Callable[[str, int], dict], default_scenes: int) -> None:
    """`<script> <mllm folder> [...] [--scenes N]`: prints `measure(folder, N)` for each folder, one key a line."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="trained MLLM folders (e.g. <run>/mllm, or a benchmark's mllm)")
    parser.add_argument("--scenes", type=int, default=default_scenes)
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    for path in args.models:
        result = measure(path, args.scenes)
        print(path)
        for key, value in result.items():
            if isinstance(value, dict):
                value = ", ".join(f"{k} {v:.3f}" for k, v in value.items())
            elif isinstance(value, float):
                value = f"{value:.3f}"
            print(f"  {key}: {value}")


def single_shape_code_maps(model, seed: int, num_scenes: int, jitter: bool):
    """Single-shape test scenes, their code maps (n, ĥ, ŵ, D) and the blank image's code map (ĥ, ŵ, D)."""
    size = model.config.vq_config.image_size
    scenes = [
        sample_scene(example_rng(seed, "test", i), size, num_objects=1, jitter=jitter) for i in range(num_scenes)
    ]
    images = [render_scene(scene) for scene in scenes] + [render_scene({"image_size": size, "objects": []})]
    with torch.no_grad():
        maps = model.model.encode_images(to_pixel_values(images_to_uint8(images, size)))
    return scenes, maps[:-1], maps[-1]
