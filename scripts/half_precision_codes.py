"""How much serving a UniCode MLLM in half precision changes its image codes and reconstructions.

    python scripts/half_precision_codes.py --model outputs/demo-v15/mllm [--images 64] [--seed 0]

Encodes the same Shapes world test images with a float32 load and with bfloat16 / float16 loads of `--model`,
and prints the share of code ids that stay the same (overall and per level) and each load's reconstruction PSNR.
Nearest-code search runs in float32 at every precision, so changed ids come from the encoder's features.
"""

import argparse
import sys
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import modeling_unicode  # noqa: E402,F401 - registers the Auto classes
from training.data.shapes import build_split  # noqa: E402
from training.evaluation import reconstruct_images  # noqa: E402
from training.metrics import load_metric  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a UniCode MLLM folder (a run's mllm/)")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    def load(dtype):
        return AutoModelForImageTextToText.from_pretrained(args.model, dtype=dtype).eval()

    full = load(torch.float32)
    images = list(
        build_split("test", args.images, image_size=full.config.vq_config.image_size, seed=args.seed)["image"]
    )
    psnr = load_metric("psnr")
    reconstructions, reference = reconstruct_images(full, images)
    reference = torch.stack(reference)
    print(f"float32: PSNR {psnr.compute(predictions=reconstructions, references=images)['psnr']:.2f} dB")
    for dtype in (torch.bfloat16, torch.float16):
        reconstructions, codes = reconstruct_images(load(dtype), images)
        same = (torch.stack(codes) == reference).float()
        levels = ", ".join(f"{same[..., level].mean():.2%}" for level in range(same.shape[-1]))
        print(
            f"{str(dtype).split('.')[-1]}: {same.mean():.2%} of code ids as in float32 (per level: {levels}); "
            f"PSNR {psnr.compute(predictions=reconstructions, references=images)['psnr']:.2f} dB"
        )


if __name__ == "__main__":
    main()
