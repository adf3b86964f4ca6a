"""Stage-I comparison: every paradigm x quantizer on the tiny preset, equal step budgets.

    python scripts/stage1_table.py --llm outputs/tiny/text_lm --steps 600

Each run is `unicode-mllm train-tokenizer` in its own process (resumable: finished runs are
reused). Prints and writes `<root>/table.md` and `<root>/table.json` with the validation PSNR and
codebook usage measured by the metric modules, and the wall time of each run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

QUANTIZERS = {"vq": [], "rq": ["--depth", "2"], "hq": []}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llm", required=True, help="the text LM whose rows are the codebook (stage-0 output)")
    parser.add_argument("--root", default="outputs/stage1-table")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--train-images", type=int, default=8000)
    parser.add_argument("--paradigms", nargs="+", default=["iterative", "frozen", "dual"])
    parser.add_argument("--quantizers", nargs="+", default=list(QUANTIZERS))
    parser.add_argument("--no-train", action="store_true", help="only tabulate the runs that finished")
    args = parser.parse_args()
    root = Path(args.root)
    rows = []
    for paradigm in args.paradigms:
        for quantizer in args.quantizers:
            out = root / f"{paradigm}-{quantizer}"
            metrics_path = out / "stage1" / "metrics.json"
            if not metrics_path.is_file() and args.no_train:
                continue
            if not metrics_path.is_file():
                cmd = [
                    sys.executable,
                    "-m",
                    "training.cli",
                    "train-tokenizer",
                    "--preset",
                    "tiny",
                    "--llm",
                    args.llm,
                    "--paradigm",
                    paradigm,
                    "--quantizer",
                    quantizer,
                    *QUANTIZERS[quantizer],
                    "--steps",
                    str(args.steps),
                    "--train-images",
                    str(args.train_images),
                    "--output",
                    str(out),
                    "--resume",
                ]
                started = time.perf_counter()
                subprocess.run(cmd, check=True)
                print(f"{paradigm}/{quantizer}: {time.perf_counter() - started:.0f} s", flush=True)
            metrics = json.loads(metrics_path.read_text())
            rows.append(
                {
                    key: metrics[key]
                    for key in (
                        "paradigm",
                        "quantizer",
                        "depth",
                        "tokens_per_image",
                        "psnr",
                        "usage",
                        "perplexity",
                        "train_seconds",
                        "steps",
                    )
                }
            )
    lines = [
        "| paradigm | quantizer | codes/image | PSNR (dB) | usage | perplexity | train time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['paradigm']} | {r['quantizer']}{r['depth'] if r['quantizer'] == 'rq' else ''} | "
            f"{r['tokens_per_image']} | "
            f"{r['psnr']:.2f} | {100 * r['usage']:.1f} % | {r['perplexity']:.0f} | {r['train_seconds']:.0f} |"
        )
    table = "\n".join(lines)
    print(table)
    root.mkdir(parents=True, exist_ok=True)
    (root / "table.md").write_text(f"Steps per run: {args.steps}\n\n{table}\n")
    (root / "table.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
