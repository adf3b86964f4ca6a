"""Scene parser accuracy on clean, JPEG-75 + blur and noise images.

    python scripts/parser_accuracy.py [--num 2000] [--image-size 64] [--seed 0]

Prints, per condition: exact-scene accuracy (all objects right), wrong (parsed but not equal)
and refused (unparseable). Noise rows should be refused.
"""

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.data.scene_parser import degrade_image, parse_scene  # noqa: E402
from training.data.shapes import canonical_objects, example_rng, render_scene, sample_scene  # noqa: E402


def score(images, scenes):
    correct = wrong = refused = 0
    for image, scene in zip(images, scenes):
        parsed = parse_scene(image)
        if parsed is None:
            refused += 1
        elif canonical_objects(parsed) == canonical_objects(scene):
            correct += 1
        else:
            wrong += 1
    return correct, wrong, refused


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num", type=int, default=2000)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    scenes = [sample_scene(example_rng(args.seed, "test", i), args.image_size) for i in range(args.num)]
    clean = [render_scene(s) for s in scenes]
    blurs = (0.0, 0.5, 1.0)
    conditions = {
        "clean": clean,
        "jpeg75": [degrade_image(im, jpeg_quality=75) for im in clean],
        "jpeg75+blur(0/0.5/1.0)": [
            degrade_image(im, jpeg_quality=75, blur_radius=blurs[i % 3]) for i, im in enumerate(clean)
        ],
    }
    print(f"{args.num} scenes, {args.image_size} px, seed {args.seed}")
    print(f"{'condition':26s} {'accuracy':>9s} {'wrong':>6s} {'refused':>8s}")
    for name, images in conditions.items():
        c, w, r = score(images, scenes)
        print(f"{name:26s} {c / args.num:9.4f} {w:6d} {r:8d}")
    rng = np.random.default_rng(args.seed)
    size = args.image_size
    noise = {
        "uniform noise": [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(args.num // 4)],
        "gaussian noise": [
            np.clip(rng.normal(200, 40, (size, size, 3)), 0, 255).astype(np.uint8) for _ in range(args.num // 4)
        ],
    }
    noisy = [
        np.clip(np.asarray(im, np.float32) + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
        for im in clean[: args.num // 4]
    ]
    for name, images in noise.items():
        refused = sum(parse_scene(im) is None for im in images)
        print(f"{name:26s} refused {refused}/{len(images)} = {refused / len(images):.4f}")
    c, w, r = score(noisy, scenes[: len(noisy)])
    print(f"{'render + N(0,40) noise':26s} correct {c}, wrong {w}, refused {r} of {len(noisy)}")


if __name__ == "__main__":
    main()
