"""One stage-I step of a preset's visual tokenizer: the encoders, and what makes the patch encoder's step fast.

    python benchmarks/tokenizer_step.py [--preset tiny] [--batch 16] [--steps 10] [--threads 2]

Times forward + backward + Adam step of `UniCodeVisualTokenizer` (bf16 autocast, as stage I trains on CPU) on the
same random images, the variants interleaved so that all see the same machine load:

- `image`: `encoder_receptive_field="image"`;
- `patch`: the patch-local encoder with one latent cell per patch (`encoder_patch_cells=1`), as stage I trains it:
  1 x 1 maps as matrix products, fused Adam;
- `patch, plain convolutions`: its 1 x 1 maps through `nn.Conv2d` (`UniCodeVQConv2d` off);
- `patch, per-tensor Adam`: torch's default CPU Adam instead of the fused one;
- `preset`: the preset's own encoder (`tiny`: patches of 2 x 2 cells).

Prints ms per step and each variant's cost as a ratio of `patch`.
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modeling_unicode import UniCodeVisualTokenizer  # noqa: E402
from modeling_unicode.modeling_unicode_vq import UniCodeVQConv2d  # noqa: E402
from training.presets import vision_tokenizer_config  # noqa: E402

ONE_CELL = {"encoder_receptive_field": "patch", "encoder_patch_cells": 1}
# name: (config overrides of the preset, 1 x 1 maps as products, fused Adam)
VARIANTS = {
    "image": ({"encoder_receptive_field": "image", "encoder_patch_cells": 1}, True, True),
    "patch": (ONE_CELL, True, True),
    "patch, plain convolutions": (ONE_CELL, False, True),
    "patch, per-tensor Adam": (ONE_CELL, True, False),
    "preset": ({}, True, True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models, optimizers = {}, {}
    for name, (overrides, _, fused) in VARIANTS.items():
        config = vision_tokenizer_config(args.preset, **overrides)
        config.codebook_token_ids = list(range(config.codebook_size))
        torch.manual_seed(0)
        models[name] = UniCodeVisualTokenizer(config).train()
        optimizers[name] = torch.optim.Adam(models[name].parameters(), lr=1e-4, fused=fused, foreach=False)
    size = models["image"].config.image_size
    pixels = torch.rand(args.batch, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    seconds = dict.fromkeys(VARIANTS, 0.0)
    for step in range(args.steps + 2):  # the first two rounds warm up
        for name, (_, products, _) in VARIANTS.items():
            plain = mock.patch.object(UniCodeVQConv2d, "forward", torch.nn.Conv2d.forward)
            with nullcontext() if products else plain:
                started = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = models[name](pixels).loss
                loss.backward()
                optimizers[name].step()
                optimizers[name].zero_grad()
                if step >= 2:
                    seconds[name] += time.perf_counter() - started
    for name in VARIANTS:
        print(
            f"{name}: {1000 * seconds[name] / args.steps:.1f} ms per step "
            f"({seconds[name] / seconds['patch']:.2f}x the patch encoder's step)"
        )


if __name__ == "__main__":
    main()
