"""The command line shared by the scripts that measure one trained MLLM folder at a time and print a dict per model."""

import argparse
from typing import Callable

import torch


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
