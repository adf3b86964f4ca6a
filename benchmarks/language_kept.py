"""Language kept: stage-II recipes of a pretrained LLM compared by what they cost its English and what they learn.

Every variant starts from the same finished run folder of a pretrained-LLM preset (its LLM, visual tokenizer,
cached codes and assembled base are linked, never retrained), trains SFT for `--steps` from the preset's recipe
with the variant's changes, merges the adapter and measures:

- the LLM's perplexity on the held-out English (`training.language.text_perplexity`) before and after;
- the held-out task losses after SFT (caption, VQA answers, text-to-image codes over the code rows);
- SFT seconds and steps.

    python benchmarks/language_kept.py --run outputs/demo-gemma-270m --preset gemma-270m --steps 200 \\
        --work outputs/language-kept --variants "recipe=" "rehearsal-0.2=rehearsal_fraction:0.2"

A variant is `NAME=key:value,...` with StageIIArguments fields (empty after `=`: the recipe as it is). Results
are kept per run (`<work>/<variant>-s<seed>/result.json`); finished runs are not redone, `--table` only prints.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from learning import parse_variant  # noqa: E402

from hub_upload.run_folder import CODES_DIR, LLM_DIR, STAGE2_DIR, TEXT_LM_DIR, VISION_TOKENIZER_DIR  # noqa: E402
from training.language import text_perplexity  # noqa: E402
from training.stage2 import StageIIArguments, load_model_and_processor, stage_paths, train_stage2  # noqa: E402

RESULT = "result.json"
# Read by every variant (codes/: the rehearsal samples are appended, shared by variants that draw the same ones).
SHARED = (TEXT_LM_DIR, LLM_DIR, VISION_TOKENIZER_DIR, CODES_DIR, f"{STAGE2_DIR}/base")


def link_run(source: Path, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in SHARED:
        if (source / name).exists() and not (folder / name).exists():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).symlink_to((source / name).resolve(), target_is_directory=True)


@functools.lru_cache(maxsize=None)
def perplexity_of(folder: Path) -> float:
    """The held-out English perplexity of the model in `folder`; the shared base is measured once per invocation."""
    model, processor = load_model_and_processor(folder)
    return text_perplexity(model, processor.tokenizer)["perplexity"]


def run_one(args, name: str, settings: dict, seed: int) -> dict:
    folder = Path(args.work) / f"{name}-s{seed}"
    link_run(Path(args.run), folder)
    stage_args = StageIIArguments.from_recipe(
        folder,
        "sft",
        args.preset,
        max_steps=args.steps,
        train_images=args.train_images,
        eval_images=args.eval_images,
        save_steps=10**9,
        use_cpu=True,
        seed=seed,
        **settings,
    )
    started = time.perf_counter()
    metrics = train_stage2(stage_args)
    wall = time.perf_counter() - started
    paths = stage_paths(folder, "sft")
    after = perplexity_of(paths["merged"])
    before = perplexity_of(paths["assembled"].resolve())
    result = {
        "variant": name,
        "seed": seed,
        "settings": settings,
        "steps": metrics["global_step"],
        "sft_seconds": metrics["train_seconds"],
        "stage_wall_seconds": wall,
        "perplexity_before": before,
        "perplexity_after": after,
        "held_out_before": metrics["before"],
        "held_out": metrics["after"],
    }
    (folder / RESULT).write_text(json.dumps(result, indent=1))
    return result


def table(work: Path) -> str:
    by_name: dict[str, list[dict]] = {}
    for path in sorted(work.glob(f"*/{RESULT}")):
        result = json.loads(path.read_text())
        by_name.setdefault(result["variant"], []).append(result)
    tasks = sorted({task for results in by_name.values() for r in results for task in r["held_out"]})
    lines = [
        "| variant | seeds | perplexity before → after | increase | "
        + " | ".join(f"held-out {t} (nats)" for t in tasks)
        + " | steps | SFT s |",
        "|---|---|---|---|" + "---|" * len(tasks) + "---|---|",
    ]
    for name, results in by_name.items():
        before = statistics.fmean(r["perplexity_before"] for r in results)
        after = statistics.fmean(r["perplexity_after"] for r in results)
        losses = [statistics.fmean(r["held_out"].get(t, float("nan")) for r in results) for t in tasks]
        lines.append(
            f"| {name} | {len(results)} | {before:.2f} → {after:.2f} | {after / before - 1:+.1%} | "
            + " | ".join(f"{x:.3f}" for x in losses)
            + f" | {statistics.fmean(r['steps'] for r in results):.0f} | "
            f"{statistics.fmean(r['sft_seconds'] for r in results):.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="a run folder of a pretrained-LLM preset, finished through the codes")
    parser.add_argument("--preset", default="gemma-270m")
    parser.add_argument("--work", required=True)
    parser.add_argument("--variants", nargs="*", default=["recipe="])
    parser.add_argument("--seeds", nargs="*", type=int, default=[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--train-images", type=int, default=1000, help="the demo's stage-II scenes")
    parser.add_argument("--eval-images", type=int, default=32)
    parser.add_argument("--table", action="store_true", help="only print the table of the results in --work")
    args = parser.parse_args()
    work = Path(args.work)
    if not args.table:
        if not args.run:
            parser.error("--run is required to train")
        for spec in args.variants:
            name, settings = parse_variant(spec) if spec.partition("=")[2] else (spec.partition("=")[0], {})
            for seed in args.seeds:
                if not (work / f"{name}-s{seed}" / RESULT).is_file():
                    run_one(args, name, settings, seed)
    print(table(work))


if __name__ == "__main__":
    main()
