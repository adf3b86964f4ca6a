"""FID sanity check: two disjoint Fashion-MNIST samples vs Fashion-MNIST against Shapes world.

    python scripts/fid_check.py [--num 500]

Needs `apt-get install dataset-fashion-mnist` and `pip install 'unicode-mllm[fid]'`.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.data.real_images import load_fashion_mnist  # noqa: E402
from training.data.shapes import build_shapes_world  # noqa: E402
from training.metrics import load_metric  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num", type=int, default=500)
    args = parser.parse_args()
    n = args.num
    fmnist = load_fashion_mnist("test", num_examples=2 * n)
    a, b = list(fmnist.select(range(n))["image"]), list(fmnist.select(range(n, 2 * n))["image"])
    shapes = list(build_shapes_world(num_train=n, num_val=0, num_test=0, num_compositional=0)["train"]["image"])
    fid = load_metric("fid")
    start = time.time()
    within = fid.compute(predictions=a, references=b)["fid"]
    across = fid.compute(predictions=a, references=shapes)["fid"]
    print(f"n = {n} per set (Fashion-MNIST test split, Shapes world train seed 0, 64 px)")
    print(f"FID(FMNIST[:n], FMNIST[n:2n]) = {within:.2f}")
    print(f"FID(FMNIST[:n], Shapes)       = {across:.2f}")
    print(f"({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
