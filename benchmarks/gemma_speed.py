"""Seconds per step and peak memory of stage I and stage II on Gemma 3 270M, on CPU (issue 18's figures).

Each command measures one stage in its own process, so its peak RSS is that stage's (model loading included):

    python benchmarks/gemma_speed.py stage1 --run outputs/gemma-speed                   # the gemma-270m preset
    python benchmarks/gemma_speed.py stage1 --run outputs/gemma-speed --issue-settings  # the issue's: tiny, z = 640
    python benchmarks/gemma_speed.py stage2 --run outputs/gemma-speed                   # needs a stage1 run first
    python benchmarks/gemma_speed.py stage2 --run outputs/gemma-speed --issue-settings

`--issue-settings` reproduces what the issue measured before the preset existed: stage I with the tiny preset and
`vision_overrides={"code_dim": 640, "z_channels": 640}`; stage II as `train --stage sft --preset tiny --lora`
(full-vocabulary loss, trainable image-token rows). Stage I times `--steps` steps after two warm-up steps; stage II
is the trainer's own train_seconds over its steps (its first step included). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.data.shapes import build_split  # noqa: E402
from training.presets import load_preset  # noqa: E402
from training.stage1 import StageIArguments, StageITrainer, images_to_uint8  # noqa: E402
from training.text_lm import pretrained_text_lm  # noqa: E402


def gemma_folder(run: Path) -> str:
    return pretrained_text_lm(load_preset("gemma-270m")["text_model"], run / "text_lm")


def stage1(run: Path, issue: bool, steps: int, batch: int) -> dict:
    llm = gemma_folder(run)
    preset = "tiny" if issue else "gemma-270m"
    overrides = {"code_dim": 640, "z_channels": 640} if issue else {}
    images = images_to_uint8(build_split("train", 256, image_size=48, seed=0)["image"], 48)
    out = run / ("stage1-issue" if issue else "stage1-preset")
    args = StageIArguments.from_recipe(
        out, llm, preset, batch_size=batch, max_steps=1000, eval_images=16, vision_overrides=overrides
    )
    trainer = StageITrainer(args, images, images[:16])
    for _ in range(2):
        trainer.train_step()
    started = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    seconds = (time.perf_counter() - started) / steps
    if not issue:
        trainer.finish(0.0)  # vision_tokenizer/ for the stage-II measurement
    return {
        "preset": preset,
        "vision_overrides": overrides,
        "batch_size": batch,
        "steps": steps,
        "s_per_step": seconds,
    }


def stage2(run: Path, issue: bool, steps: int, batch: int) -> dict:
    # here, not at the top: the stage-I process would count TRL's and PEFT's imports in its peak RSS
    from training.stage2 import StageIIArguments, train_stage2

    tokenizer = run / "stage1-preset" / "vision_tokenizer"
    if not (tokenizer / "config.json").is_file():
        raise SystemExit(f"no {tokenizer}: run `python benchmarks/gemma_speed.py stage1 --run {run}` first")
    out = run / ("sft-issue" if issue else "sft-preset")
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(tokenizer, out / "vision_tokenizer")
    preset = "tiny" if issue else "gemma-270m"
    args = StageIIArguments.from_recipe(
        out,
        "sft",
        preset,
        llm=gemma_folder(run),
        lora=True,
        batch_size=batch,
        max_steps=steps,
        train_images=200,
        eval_images=4,
        eval_rows_per_task=4,
        save_steps=10**6,
        logging_steps=1,
    )
    metrics = train_stage2(args)
    return {
        "preset": preset,
        "batch_size": batch,
        "steps": metrics["global_step"],
        "s_per_step": metrics["train_seconds"] / metrics["global_step"],
        "code_logits": args.code_logits,
        "train_image_tokens": args.train_image_tokens,
        "bf16": bool(args.extra.get("bf16")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["stage1", "stage2"])
    parser.add_argument("--run", default="outputs/gemma-speed", help="work folder (Gemma is dequantized into it once)")
    parser.add_argument("--issue-settings", action="store_true", help="the settings issue 18 measured")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, help="default: 8 for stage I, 2 for stage II (the issue's)")
    args = parser.parse_args()
    run = Path(args.run)
    batch = args.batch_size or (8 if args.stage == "stage1" else 2)
    result = (stage1 if args.stage == "stage1" else stage2)(run, args.issue_settings, args.steps, batch)
    # ru_maxrss is in KiB on Linux.
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    print(json.dumps({"stage": args.stage, "issue_settings": args.issue_settings, **result}))


if __name__ == "__main__":
    main()
