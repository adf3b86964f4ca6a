"""Self-rehearsal's sampling cost: `training.rehearsal.sample_rehearsal_text` (inverse-CDF draws, with and without
the top-k reference sets) against `generate(do_sample=True)` (torch.multinomial) on the same model, rows and length.

    python benchmarks/rehearsal_sampling.py --model outputs/demo-gemma-270m/stage2/base --rows 32 --tokens 16

Prints seconds per row for each and the ratio to `generate`. Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.rehearsal import sample_rehearsal_text  # noqa: E402
from training.sft import image_special_token_ids  # noqa: E402
from training.stage2 import load_model_and_processor  # noqa: E402


def timed(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a UniCode MLLM folder (a run's stage2/base)")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=32)
    args = parser.parse_args()
    model, processor = load_model_and_processor(Path(args.model))
    tokenizer = processor.tokenizer
    prompt = torch.full((args.rows, 1), tokenizer.bos_token_id, dtype=torch.long)

    def generate():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            model.generate(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                do_sample=True,
                top_k=0,
                top_p=1.0,
                max_new_tokens=args.tokens,
                min_new_tokens=args.tokens,
                pad_token_id=tokenizer.eos_token_id,
                suppress_tokens=image_special_token_ids(model),
            )

    seconds = {
        "generate (torch.multinomial)": timed(generate),
        "inverse CDF": timed(
            lambda: sample_rehearsal_text(model, tokenizer, args.rows, args.tokens, batch_size=args.rows)
        ),
        f"inverse CDF + top-{args.top_k} references": timed(
            lambda: sample_rehearsal_text(
                model, tokenizer, args.rows, args.tokens, batch_size=args.rows, top_k=args.top_k
            )
        ),
    }
    print(f"{args.rows} rows x {args.tokens} tokens, {torch.get_num_threads()} threads")
    print("| sampler | s / row | vs generate |")
    print("|---|---|---|")
    peer = seconds["generate (torch.multinomial)"]
    for name, value in seconds.items():
        print(f"| {name} | {value / args.rows:.3f} | {peer / value:.2f}x |")


if __name__ == "__main__":
    main()
