"""One stage-I step of a preset's visual tokenizer, the image encoder against the patch-local one, in one run.

    python benchmarks/tokenizer_step.py [--preset tiny] [--batch 16] [--steps 10] [--threads 2]

Times forward + backward of `UniCodeVisualTokenizer` (bf16 autocast, as stage I trains on CPU) for
`encoder_receptive_field` "image" and "patch" on the same random images, interleaved so both see the same machine
load, and prints ms per step and the patch encoder's cost as a ratio of the image encoder's.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modeling_unicode import UniCodeVisualTokenizer  # noqa: E402
from training.presets import vision_tokenizer_config  # noqa: E402

FIELDS = ("image", "patch")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = {}
    for field in FIELDS:
        config = vision_tokenizer_config(args.preset, encoder_receptive_field=field)
        config.codebook_token_ids = list(range(config.codebook_size))
        torch.manual_seed(0)
        models[field] = UniCodeVisualTokenizer(config).train()
    size = models["image"].config.image_size
    pixels = torch.rand(args.batch, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    seconds = {field: 0.0 for field in FIELDS}
    for step in range(args.steps + 2):  # the first two rounds warm up
        for field in FIELDS:
            started = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                models[field](pixels).loss.backward()
            if step >= 2:
                seconds[field] += time.perf_counter() - started
    for field in FIELDS:
        print(f"encoder_receptive_field={field}: {1000 * seconds[field] / args.steps:.1f} ms per step")
    print(f"patch / image: {seconds['patch'] / seconds['image']:.2f}x")


if __name__ == "__main__":
    main()
