"""Nearest-code search and quantizer speed/memory, side by side with vector-quantize-pytorch.

    python benchmarks/quantizer.py            # both shapes, all contenders (a few minutes on 2 cores)
    python benchmarks/quantizer.py --quick    # smaller N, for a smoke run

Every contender runs in its own subprocess on the same seeded data, so peak memory is its own:
"extra memory" = peak RSS minus RSS once the inputs exist. The reference is this machine's GEMM
(the N x K score matrix is the irreducible work): "% of GEMM" = GEMM time / contender time.
vector-quantize-pytorch (the `bench` extra) materialises an N x K distance matrix, so it is fed in
row chunks of `--peer-chunk` rows to fit in memory; its peak is for that chunk size.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = [(65536, 256, 16384), (4096, 4096, 32000)]
CONTENDERS = ["gemm", "ours_search", "ours_vq", "ours_rq4", "vqpytorch_vq", "vqpytorch_rq4"]
GRID = 8  # quantizer inputs are (B, D, 8, 8) feature maps, N = B * 64


def rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_data(n: int, d: int, k: int):
    generator = torch.Generator().manual_seed(0)
    return torch.randn(n, d, generator=generator), torch.randn(k, d, generator=generator)


def run_worker(name: str, n: int, d: int, k: int, peer_chunk: int) -> dict:
    torch.manual_seed(0)
    vectors, codebook = make_data(n, d, k)
    setup = None
    if name.startswith("ours_") and name != "ours_search":
        # here, not at the top: each contender's imports count in its own worker's memory, not the others'
        from modeling_unicode import UniCodeQuantizer, UniCodeVisualTokenizerConfig

        depth = 4 if name.endswith("rq4") else 1
        config = UniCodeVisualTokenizerConfig(
            quantizer="rq" if depth > 1 else "vq", depth=depth, codebook_size=k, code_dim=d, norm_handling="none"
        )
        quantizer = UniCodeQuantizer(config)
        features = vectors.reshape(n // GRID**2, GRID, GRID, d).permute(0, 3, 1, 2).contiguous()
        setup = lambda: quantizer(features, codebook)  # noqa: E731
    elif name.startswith("vqpytorch"):
        from vector_quantize_pytorch import ResidualVQ, VectorQuantize  # optional: the `bench` extra

        if name.endswith("rq4"):
            peer = ResidualVQ(dim=d, num_quantizers=4, codebook_size=k, shared_codebook=True, decay=0.99)
        else:
            peer = VectorQuantize(dim=d, codebook_size=k, decay=0.99)
        peer.eval()

        def setup():
            for start in range(0, n, peer_chunk):
                peer(vectors[start : start + peer_chunk].unsqueeze(0))
    elif name == "ours_search":
        from modeling_unicode import nearest_code  # here: counted in this worker's memory only

        setup = lambda: nearest_code(vectors, codebook)  # noqa: E731
    elif name == "gemm":
        # The bare score GEMM (N x D) @ (D x K), in blocks small enough to stay in cache-friendly memory.
        codebook_t = codebook.t().contiguous()

        def setup():
            for start in range(0, n, 1024):
                torch.mm(vectors[start : start + 1024], codebook_t)
    else:
        raise ValueError(f"unknown contender {name!r}")
    baseline = rss_mb()
    with torch.inference_mode():
        setup()  # warm-up (allocator, kernels), also counted in the peak
        start = time.perf_counter()
        setup()
        seconds = time.perf_counter() - start
    return {"name": name, "seconds": seconds, "extra_mb": max(0.0, peak_rss_mb() - baseline)}


def spawn(name: str, n: int, d: int, k: int, peer_chunk: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--shape", f"{n},{d},{k}", "--peer-chunk", str(peer_chunk)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        return {"name": name, "error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker")
    parser.add_argument("--shape")
    parser.add_argument("--peer-chunk", type=int, default=8192)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.worker:
        n, d, k = map(int, args.shape.split(","))
        print(json.dumps(run_worker(args.worker, n, d, k, args.peer_chunk)))
        return

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; peer row chunk {args.peer_chunk}")
    rows = []
    for n, d, k in SHAPES:
        if args.quick:
            n = n // 16
        results = {name: spawn(name, n, d, k, args.peer_chunk) for name in CONTENDERS}
        gemm = results["gemm"]["seconds"]
        print(f"\nN={n}, D={d}, K={k}: GEMM {2 * n * d * k / gemm / 1e9:.1f} GFLOP/s ({gemm:.2f} s)")
        print("| contender | vectors/s | % of GEMM | extra MB | ours / vq-pytorch |")
        print("|---|---|---|---|---|")
        for name in CONTENDERS[1:]:
            res = results[name]
            if "error" in res:
                print(f"| {name} | failed: {res['error']} | | | |")
                continue
            levels = 4 if name.endswith("rq4") else 1
            ratio = ""
            peer = {"ours_vq": "vqpytorch_vq", "ours_rq4": "vqpytorch_rq4", "ours_search": "vqpytorch_vq"}.get(name)
            if peer and "seconds" in results.get(peer, {}):
                ratio = f"{results[peer]['seconds'] / res['seconds']:.2f}x faster"
            print(
                f"| {name} | {n / res['seconds']:,.0f} | {100 * levels * gemm / res['seconds']:.0f} % "
                f"| {res['extra_mb']:,.0f} | {ratio} |"
            )
            rows.append({"shape": [n, d, k], **res})
    print("\n" + json.dumps(rows))


if __name__ == "__main__":
    main()
