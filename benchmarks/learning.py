"""The learning benchmark: stage-II recipes compared at equal wall-clock seconds on one stage-0 / I run.

Every variant starts from the same finished run folder (its text LM, visual tokenizer, cached codes and
assembled base are copied, never retrained), trains stage II for `--seconds` of wall clock (the learning
rate follows the elapsed fraction: `training.sft.WallClockBudget`), once per seed, and is evaluated the
same way. One markdown table comes out, one row per variant (mean of its seeds, each seed in brackets):

- VQA overall, per question type, on one-shape and on 2+-shape scenes, with the prior-only chance and the
  accuracy when every question is asked about another scene's image ("swapped");
- text-to-image all-correct and per attribute on single-shape prompts, with the tokenizer's ceiling;
- held-out losses: text-to-image nats per code on background patches and on shape patches, VQA answers;
- SFT seconds, steps and tokens/s.

    python benchmarks/learning.py --run outputs/demo-tiny --work outputs/learning --seconds 240 \\
        --variants baseline head=output_head:trained --seeds 0 1 --jobs 2

With `--steps N` every run trains N steps instead (the learning rate on the recipe's step schedule): the same
comparison for levers that leave a step's cost unchanged (another tokenizer, decoding), and one that does not depend
on what else the machine runs.

A variant is `NAME` (a lever defined in LEVERS below) or `NAME=key:value,key:value` with StageIIArguments fields
(and `guidance`, `top_k`, `temperature` for decoding). With `--jobs 2` two runs train at once on one thread
each, so compare rows of one `--jobs`/`--threads` setting only. Results are kept per run
(`<work>/<variant>-s<seed>/result.json`); finished runs are not redone, and `--table` only prints. `--rescore`
scores the kept models of finished runs again on `--vqa-images` / `--generation-prompts` (both sets grow by
appending, so a larger one holds the smaller): rows measured on a small set, compared on a larger one.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hub_upload.run_folder import (  # noqa: E402
    CODES_DIR,
    LLM_DIR,
    MLLM_DIR,
    STAGE2_DIR,
    TEXT_LM_DIR,
    VISION_TOKENIZER_DIR,
)
from training.data.scene_parser import patch_colours  # noqa: E402
from training.data.shapes import build_split, render_scene  # noqa: E402
from training.evaluation import evaluate_generation, evaluate_vqa, majority_answers, train_question_rows  # noqa: E402
from training.sft import CodesCollator  # noqa: E402
from training.stage2 import StageIIArguments, load_model_and_processor, shapes_code_datasets, train_stage2  # noqa: E402
from training.tasks import generation_tasks, tokenize_tasks  # noqa: E402

# The recipe this benchmark starts from (the tiny demo's stage II before this benchmark existed); each lever
# changes what it names, nothing else.
BASE = {
    "lora": False,
    "reinit_decoder": True,
    "learning_rate": 1e-3,
    "batch_size": 8,
    "train_images": 1000,
    "questions_per_image": 2,
    "segments": 4,
    "caption_drop": 0.1,
}
DECODING = {"guidance": 3.0, "top_k": None, "temperature": 1.0}
LEVERS = {
    "baseline": {},
    "head": {"output_head": "trained"},
    "row_loss": {"loss_normalization": "row"},
    "positions": {"image_positions": True},
}
RESULT = "result.json"


def sampling_settings(decoding: dict) -> dict:
    """generate()'s sampling arguments of a variant's decoding (none: greedy)."""
    if not decoding["top_k"]:
        return {}
    return {"do_sample": True, "top_k": decoding["top_k"], "temperature": decoding["temperature"]}


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, spec = text.partition("=")
    if not spec:
        if name not in LEVERS:
            raise SystemExit(f"variant {name!r} is not a lever ({sorted(LEVERS)}); write NAME=key:value,...")
        return name, dict(LEVERS[name])
    settings = {}
    for item in re.split(r",(?![^\[]*\])(?![^{]*})", spec):  # commas inside [a,b] or {a: 1, b: 2} belong to the value
        key, sep, value = item.partition(":")
        if not sep:
            raise SystemExit(f"variant {text!r}: {item!r} is not key:value")
        settings[key] = yaml.safe_load(value)
    return name, settings


def copy_run(source: Path, work: Path, train_images: int) -> None:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for name in (TEXT_LM_DIR, VISION_TOKENIZER_DIR, LLM_DIR, f"{STAGE2_DIR}/base"):
        path = source / name
        if path.is_dir():
            shutil.copytree(path, work / name)
    codes = source / CODES_DIR
    for folder in codes.iterdir() if codes.is_dir() else []:
        # Other train sizes are encoded by train_stage2 and the seconds it takes are reported apart.
        if folder.name.startswith("validation") or folder.name.startswith(f"train-{train_images}-"):
            shutil.copytree(folder, work / CODES_DIR / folder.name)


def code_losses(model, processor, eval_codes, depth: int) -> dict:
    """Teacher-forced nats per code of held-out text-to-image rows (caption always given), split by whether
    the code's patch shows any shape: background codes are most of an image and easy."""
    rows = tokenize_tasks(
        generation_tasks(eval_codes, depth, segments=1, caption_drop=0.0), processor, desc="code loss rows"
    )
    codebook = set(model.config.vq_config.codebook_token_ids)
    grid, size = model.config.vq_config.code_grid_size, model.config.vq_config.image_size
    collate = CodesCollator(processor.tokenizer.pad_token_id)
    sums = {"background": [0.0, 0], "shape": [0.0, 0]}
    with torch.no_grad():
        for index, row in enumerate(rows):
            batch = collate([row])
            labels = batch.pop("labels")[0, 1:]
            logits = model(**batch).logits[0, :-1].float()
            nats = torch.nn.functional.cross_entropy(logits, labels.clamp(min=0), reduction="none")
            is_code = torch.tensor([int(t) in codebook for t in labels.tolist()])
            code_nats = nats[is_code].tolist()
            image = render_scene(eval_codes[index]["scene"], size)
            empty = patch_colours(image, grid, 1.0 / (size // grid) ** 2).reshape(-1) < 0  # no shape pixel at all
            background = np.repeat(empty, depth)[: len(code_nats)]
            for value, is_background in zip(code_nats, background):
                entry = sums["background" if is_background else "shape"]
                entry[0] += value
                entry[1] += 1
    return {name: total / max(count, 1) for name, (total, count) in sums.items()}


def run_one(args, name: str, settings: dict, seed: int) -> dict:
    """Train one (variant, seed) into <work>/<name>-s<seed> and evaluate it; returns the result."""
    decoding = {k: settings.pop(k, v) for k, v in DECODING.items()}
    trained_by = settings.pop("decode", None)  # a decoding-only row: another variant's models, drawn otherwise
    folder = Path(args.work) / f"{name}-s{seed}"
    sampling = sampling_settings(decoding)
    if trained_by:
        # Decoding changes only the drawings: the source's training, VQA and losses stand as they were measured.
        result = json.loads((Path(args.work) / f"{trained_by}-s{seed}" / RESULT).read_text())
        model, processor = load_model_and_processor(Path(args.work) / f"{trained_by}-s{seed}" / MLLM_DIR)
        generation = evaluate_generation(
            model.eval(), processor, args.generation_prompts, decoding["guidance"], **sampling
        )
        result.update(
            {
                "variant": name,
                "trained_by": trained_by,
                "settings": {**result["settings"], **decoding},
                "generation_prompts": args.generation_prompts,
                "t2i": {k: v for k, v in generation["model"].items() if k != "num_images"},
            }
        )
        folder.mkdir(parents=True, exist_ok=True)
        (folder / RESULT).write_text(json.dumps(result, indent=1))
        return result
    stage = {**BASE, **settings}
    copy_run(Path(args.run), folder, stage["train_images"])
    started = time.perf_counter()
    trainer = {
        "save_strategy": "no",
        "bf16": "auto",  # as the recipes: bf16 autocast only where the CPU multiplies bf16 (training/precision.py)
        "logging_steps": 50,
        **stage.get("extra", {}),
    }  # extra: SFTConfig fields
    budget = {"max_steps": args.steps} if args.steps else {"max_seconds": args.seconds}
    stage_args = StageIIArguments(
        run_dir=str(folder),
        stage="sft",
        **budget,
        eval_images=args.eval_images,
        save_steps=10**9,
        use_cpu=True,
        seed=seed,
        extra=trainer,
        **{k: v for k, v in stage.items() if k != "extra"},
    )
    metrics = train_stage2(stage_args)
    wall = time.perf_counter() - started
    model, processor = load_model_and_processor(folder / MLLM_DIR)
    model.eval()
    _, eval_codes = shapes_code_datasets(folder, model, stage["train_images"], args.eval_images, seed)
    losses = code_losses(model, processor, eval_codes, model.config.vq_config.depth)
    result = {
        "variant": name,
        "seed": seed,
        "settings": {**stage, **decoding},
        "seconds_budget": None if args.steps else args.seconds,
        "steps_budget": args.steps,
        "trained_by": name,
        "threads": torch.get_num_threads(),
        "sft_seconds": metrics["train_seconds"],
        "steps": metrics["global_step"],
        "stage_wall_seconds": wall,
        "tokens_per_second": metrics.get("train_tokens", 0) / max(metrics["train_seconds"], 1e-9),
        "held_out": metrics["after"],
        "code_nats": losses,
        **task_scores(model, processor, args, stage["train_images"], decoding, vqa_layout_of(stage)),
    }
    (folder / RESULT).write_text(json.dumps(result, indent=1))
    for heavy in (
        STAGE2_DIR,
        CODES_DIR,
        TEXT_LM_DIR,
        LLM_DIR,
        VISION_TOKENIZER_DIR,
    ):  # keep mllm/ (the model) and the result only
        shutil.rmtree(folder / heavy, ignore_errors=True)
    return result


def vqa_layout_of(settings: dict) -> str:
    """The VQA layout a run trained with; runs before `vqa_layout` recorded `question_first` (a bool) instead."""
    return settings.get("vqa_layout", "question_first" if settings.get("question_first") else "image_first")


def task_scores(model, processor, args, train_images: int, decoding: dict, vqa_layout: str) -> dict:
    """VQA on the first `--vqa-images` test scenes and drawing of the first `--generation-prompts` prompts (both
    sets grow by appending, so a larger set holds the smaller one), with the sizes they were measured on."""
    test = build_split("test", args.vqa_images, image_size=model.config.vq_config.image_size, seed=0)
    prior = majority_answers(train_question_rows(train_images, 0))
    vqa = evaluate_vqa(model, processor, test, prior, swapped_images=True, vqa_layout=vqa_layout)
    sampling = sampling_settings(decoding)
    generation = evaluate_generation(model, processor, args.generation_prompts, decoding["guidance"], **sampling)
    keep = lambda scores: {k: v for k, v in scores.items() if k.startswith("accuracy")}  # noqa: E731
    return {
        "vqa_images": args.vqa_images,
        "generation_prompts": args.generation_prompts,
        "vqa": keep(vqa["model"]),
        "vqa_chance": keep(vqa["chance"]),
        "vqa_swapped": keep(vqa["swapped"]),
        "vqa_one_shape": keep(vqa["model_one_shape"]),
        "vqa_multi_shape": keep(vqa["model_multi_shape"]),
        "vqa_one_shape_chance": keep(vqa["chance_one_shape"]),
        "t2i": {k: v for k, v in generation["model"].items() if k != "num_images"},
        "t2i_ceiling": {k: v for k, v in generation["ceiling"].items() if k != "num_images"},
    }


def rescore(args, folder: Path) -> None:
    """Score a finished run's kept model again on `--vqa-images` / `--generation-prompts` (its training, losses and
    speed stand): a larger evaluation set for rows measured on a small one."""
    result = json.loads((folder / RESULT).read_text())
    if (result.get("vqa_images", 60), result.get("generation_prompts", 32)) == (
        args.vqa_images,
        args.generation_prompts,
    ):
        return
    trained = folder.parent / f"{result['trained_by']}-s{result['seed']}"  # a decoding-only row draws its source's
    model, processor = load_model_and_processor(trained / MLLM_DIR)
    decoding = {k: result["settings"].get(k, v) for k, v in DECODING.items()}
    train_images = result["settings"].get("train_images", BASE["train_images"])
    vqa_layout = vqa_layout_of(result["settings"])
    result.update(task_scores(model.eval(), processor, args, train_images, decoding, vqa_layout))
    (folder / RESULT).write_text(json.dumps(result, indent=1))
    print(
        f"rescored {folder}: VQA {100 * result['vqa']['accuracy']:.1f}, one-shape "
        f"{100 * result['vqa_one_shape']['accuracy']:.1f}, drawing {100 * result['t2i']['all_correct']:.1f}"
    )


def _mean(results: list[dict], path: str) -> tuple[float, list[float]]:
    values = []
    for result in results:
        value = {"vqa_images": 60, "generation_prompts": 32, **result}  # the sizes of results that predate the fields
        for key in path.split("."):
            value = value.get(key, float("nan")) if isinstance(value, dict) else float("nan")
        values.append(float(value))
    return statistics.fmean(values), values


def table(work: Path, names: list[str]) -> str:
    """Markdown: one row per variant, means over seeds (each seed's value in brackets for the headline)."""
    by_name: dict[str, list[dict]] = {}
    for path in sorted(work.glob(f"*/{RESULT}")):
        result = json.loads(path.read_text())
        by_name.setdefault(result["variant"], []).append(result)
    columns = [
        ("VQA", "vqa.accuracy", True),
        ("swapped", "vqa_swapped.accuracy", False),
        ("chance", "vqa_chance.accuracy", False),
        ("1-shape", "vqa_one_shape.accuracy", True),
        ("2+-shape", "vqa_multi_shape.accuracy", False),
    ]
    types = ("color", "shape", "size", "count", "existence", "position", "relation")
    columns += [(t[:5], f"vqa.accuracy_{t}", False) for t in types]
    drawing = [
        ("T2I all-correct", "t2i.all_correct", True),
        ("colour", "t2i.color", False),
        ("shape", "t2i.shape", False),
        ("size", "t2i.size", False),
        ("position", "t2i.position", False),
        ("unparseable", "t2i.unparseable", False),
        ("ceiling", "t2i_ceiling.all_correct", False),
        ("nats/code background", "code_nats.background", False),
        ("nats/code shape", "code_nats.shape", False),
        ("answer loss", "held_out.vqa", False),
        ("steps", "steps", False),
        ("tokens/s", "tokens_per_second", False),
        ("VQA scenes", "vqa_images", False),
        ("prompts", "generation_prompts", False),
    ]
    return "\n\n".join(_rows(by_name, names, part) for part in (columns, drawing))


def _rows(by_name: dict, names: list[str], columns: list) -> str:
    lines = ["| variant | seeds | " + " | ".join(c[0] for c in columns) + " |", "|---|---|" + "---|" * len(columns)]
    for name in names or sorted(by_name):
        results = by_name.get(name)
        if not results:
            continue
        cells = []
        for label, path, show_seeds in columns:
            mean, values = _mean(results, path)
            if path in ("steps", "tokens_per_second", "vqa_images", "generation_prompts"):
                cells.append(f"{mean:.0f}")
            elif label.startswith("nats") or label == "answer loss":
                cells.append(f"{mean:.2f}")
            else:
                cells.append(
                    f"{100 * mean:.1f}"
                    + (f" ({' / '.join(f'{100 * v:.1f}' for v in values)})" if show_seeds and len(values) > 1 else "")
                )
        lines.append(f"| {name} | {len(results)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="a finished demo run folder (stage 0, stage I, codes)")
    parser.add_argument("--work", required=True, help="where each run's folder and result.json go")
    parser.add_argument("--variants", nargs="*", default=["baseline"])
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1])
    parser.add_argument("--seconds", type=float, default=240.0, help="SFT wall-clock budget per run")
    parser.add_argument(
        "--steps", type=int, default=None, help="SFT steps per run instead of --seconds (equal steps, not seconds)"
    )
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at once (each on --threads threads)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: cores / jobs)")
    parser.add_argument("--vqa-images", type=int, default=60)
    parser.add_argument("--generation-prompts", type=int, default=32)
    parser.add_argument("--eval-images", type=int, default=32, help="held-out scenes for the losses")
    parser.add_argument("--table", action="store_true", help="only print the table of the results in --work")
    parser.add_argument(
        "--rescore",
        action="store_true",
        help="score the finished runs of --variants (all in --work without it) again on --vqa-images and "
        "--generation-prompts, then print the table",
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child process: one variant spec
    args = parser.parse_args()
    work = Path(args.work)
    if args.table:
        print(table(work, [spec.partition("=")[0] for spec in args.variants] if args.variants != ["baseline"] else []))
        return
    if args.rescore:
        names = [spec.partition("=")[0] for spec in args.variants] if args.variants != ["baseline"] else []
        for path in sorted(work.glob(f"*/{RESULT}")):
            if not names or json.loads(path.read_text())["variant"] in names:
                rescore(args, path.parent)
        print(table(work, names))
        return
    variants = [parse_variant(v) for v in args.variants]
    if args.one:
        name, settings = parse_variant(args.one)
        run_one(args, name, settings, args.seeds[0])
        return
    if not args.run:
        parser.error("--run is required to train")
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    pending = [
        (spec, seed)
        for spec, (name, _) in zip(args.variants, variants)
        for seed in args.seeds
        if not (work / f"{name}-s{seed}" / RESULT).is_file()
    ]
    running: list[subprocess.Popen] = []
    work.mkdir(parents=True, exist_ok=True)
    while pending or running:
        while pending and len(running) < args.jobs:
            spec, seed = pending.pop(0)
            name = spec.partition("=")[0]
            env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
            command = [
                sys.executable,
                __file__,
                "--run",
                args.run,
                "--work",
                args.work,
                "--one",
                spec,
                "--seeds",
                str(seed),
                "--seconds",
                str(args.seconds),
                *(["--steps", str(args.steps)] if args.steps else []),
                "--vqa-images",
                str(args.vqa_images),
                "--generation-prompts",
                str(args.generation_prompts),
                "--eval-images",
                str(args.eval_images),
            ]
            log = open(work / f"{name}-s{seed}.log", "w")
            running.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT))
        time.sleep(2)
        for process in [p for p in running if p.poll() is not None]:
            running.remove(process)
            if process.returncode:
                print(
                    f"a run failed (exit {process.returncode}): {' '.join(process.args[-12:])}; see its log in {work}",
                    file=sys.stderr,
                )
    print(table(work, [name for name, _ in variants]))


if __name__ == "__main__":
    main()
