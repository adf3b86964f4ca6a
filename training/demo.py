"""`unicode-mllm demo`: the whole mission in one command, offline, on the Shapes world.

stage 0 (text LM) -> stage I (visual tokenizer, unified codebook) -> code datasets -> decompression
pre-training -> instruction tuning -> evaluation -> the run folder of docs/design.md:

    <run>/text_lm/ vision_tokenizer/ codes/ stage1/ stage2/   the stages' own outputs
    <run>/mllm/                 the final model (AutoModelForImageTextToText / AutoProcessor)
    <run>/adapter/              a copy of the SFT LoRA adapter (PEFT; its base is stage2/decompress/model); none
                                when the recipe fine-tunes fully (`stage2.lora: false`)
    <run>/report.json           metrics + chance levels + text-to-image ceiling + goals, settings, wall time per
                                stage, versions
    <run>/report.md             the same as tables
    <run>/samples.png           inputs, reconstructions, generated images under their prompts, answers
    <run>/question.png          the one answered question's image, its question, answer and truth printed below
    <run>/generated.png         one generated image
    <run>/demo_stages.json      the settings each finished stage was made with

Budgets come from the preset recipe's `demo` section (CLI flags and `budget=` override them). Every
stage skips itself when its output folder is complete, so re-running resumes where a run stopped; a
complete folder made with other settings (or with no record of them) stops the run with a ValueError
instead of being reused or overwritten.
"""

from __future__ import annotations

import importlib.metadata as metadata
import json
import os
import platform
import shutil
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from PIL import Image, ImageDraw, ImageFont

from hub_upload.run_folder import (
    ADAPTER_DIR,
    CODES_DIR,
    DEMO_STAGES_FILE,
    GENERATED_FILE,
    LLM_DIR,
    MLLM_DIR,
    QUESTION_FILE,
    REPORT_FILE,
    REPORT_MARKDOWN_FILE,
    SAMPLES_FILE,
    STAGE1_DIR,
    STAGE2_DIR,
    TEXT_LM_DIR,
    VISION_TOKENIZER_DIR,
)
from modeling_unicode import UniCodeVisualTokenizerConfig
from modeling_unicode.configuration_unicode import check_visual_input
from modeling_unicode.modeling_unicode import check_guidance_scale

from .checkpointing import atomic_save_image, atomic_write_json, atomic_write_text, is_complete
from .data.shapes import build_split, final_answer, shapes_world_fingerprint, text_corpus
from .evaluation import (
    LEAST_GENERATION_PROMPTS,
    above_chance,
    check_device,
    evaluate_on_shapes,
    metrics_markdown,
    require_whole_number,
)
from .language import language_kept, text_perplexity
from .presets import load_preset, load_recipe, preset_visual_input
from .run_guard import setting_differences
from .stage1 import StageIArguments, StageITrainer, images_to_uint8
from .stage2 import (
    StageIIArguments,
    assemble_base,
    load_model_and_processor,
    shapes_code_datasets,
    stage_complete,
    train_stage2,
)
from .tasks import task_rows_fingerprint
from .text_lm import (
    check_llm_path,
    load_text_lm,
    packed_blocks,
    pretrained_text_lm,
    recipe_training_settings,
    train_text_lm,
)

# Keys of a recipe's `demo` section; every one must be set there or in `budget=`.
BUDGET_KEYS = (
    "text_scenes",
    "stage0_steps",
    "stage1_steps",
    "stage1_train_images",
    "stage1_eval_images",
    "stage2_train_images",
    "stage2_eval_images",
    "decompress_steps",
    "sft_steps",
    "vqa_images",
    "compositional_images",
    "generation_prompts",
    "reconstruction_images",
    "usage_images",
    "guidance_scale",
)
STAGE0_BUDGET_KEYS = ("text_scenes", "stage0_steps")


class DemoSettingsError(ValueError):
    """A demo or ablation asked for something it cannot run (preset, budget, device, or a run folder made
    with other settings); raised before any training, and printed by the CLI without a traceback."""


@dataclass
class DemoArguments:
    output_dir: str = "outputs/demo-tiny"
    preset: str = "tiny"
    seed: int = 0
    device: str = "cpu"
    budget: dict = field(default_factory=dict)  # overrides of the recipe's `demo` section
    # A pretrained causal LM (folder or .gguf) instead of the preset's: it replaces stage 0's LLM.
    llm: Optional[str] = None
    # Reduced settings (tests): overrides of the preset's text model / visual tokenizer.
    text_model_overrides: dict = field(default_factory=dict)
    vision_overrides: dict = field(default_factory=dict)
    # Overrides of stage I's arguments (`StageIArguments` fields, e.g. how it learns the codebook: dual_sync_interval).
    stage1_overrides: dict = field(default_factory=dict)
    codebook_size: Optional[int] = None
    paradigm: Optional[str] = None
    quantizer: Optional[str] = None
    visual_input: Optional[str] = None  # "aggregate" | "flatten"; default: the model preset's
    decompress: bool = True
    quiet: bool = False


def _recipe(preset: str) -> dict:
    try:
        return load_recipe(preset)
    except ValueError as error:
        raise DemoSettingsError(str(error)) from None


def demo_budget(preset: str, overrides: Optional[dict] = None) -> dict:
    """The recipe's `demo` section with `overrides`, checked for unknown and missing keys."""
    return _checked_budget(preset, _recipe(preset), load_preset(preset), overrides)


def _checked_budget(preset: str, recipe: dict, model_preset: dict, overrides: Optional[dict]) -> dict:
    section = dict(recipe.get("demo") or {})
    goals = section.pop("goals", {})
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(BUDGET_KEYS))
    if unknown:
        raise DemoSettingsError(f"budget has unknown keys {unknown}; use some of {list(BUDGET_KEYS)}")
    budget = {**section, **overrides}
    # A pretrained LLM has no stage-0 training to budget.
    trains_stage0 = model_preset["text_model"].get("source") == "stage0"
    missing = [k for k in BUDGET_KEYS if k not in budget and (trains_stage0 or k not in STAGE0_BUDGET_KEYS)]
    if missing:
        raise DemoSettingsError(
            f"the {preset!r} recipe's `demo` section lacks {missing}; add them to "
            f"configuration/recipes/{preset}.yaml or pass them in budget="
        )
    # Checked here, before any training, rather than by the stage that would fail on it minutes later.
    try:
        for key, value in budget.items():
            if key == "guidance_scale":
                check_guidance_scale(value)
            elif key == "decompress_steps":
                require_whole_number(f"budget {key}", value, least=0, why=" (0 skips the stage)")
            else:
                least = LEAST_GENERATION_PROMPTS if key == "generation_prompts" else {}
                require_whole_number(f"budget {key}", value, **least)
    except ValueError as error:
        raise DemoSettingsError(str(error)) from None
    return {**budget, "goals": goals}


@dataclass
class DemoPlan:
    """What a demo run reads from its preset and recipe, resolved once at the door (`resolve`) and handed to every
    stage: nothing after it reads the preset's or the recipe's files again."""

    preset_name: str
    preset: dict  # the model preset, with DemoArguments.text_model_overrides applied
    recipe: dict
    budget: dict  # the recipe's `demo` section with DemoArguments.budget, checked; the goals apart
    goals: dict
    decompress: bool  # decompression pre-training runs (`decompress_steps: 0` in a budget skips it too)
    visual_input: str  # how an input image enters the LLM: DemoArguments.visual_input, else the model preset's
    # Stage II trains LoRA adapters (the recipe's `stage2.lora`; LoRA unless it says full fine-tuning): it decides
    # the SFT arguments, when a stage-II folder is complete, and whether the run has an adapter.
    lora: bool

    @classmethod
    def resolve(cls, args: DemoArguments) -> "DemoPlan":
        recipe, preset = _recipe(args.preset), load_preset(args.preset)
        budget = _checked_budget(args.preset, recipe, preset, args.budget)
        goals = budget.pop("goals")
        return cls(
            preset_name=args.preset,
            preset={**preset, "text_model": {**preset["text_model"], **args.text_model_overrides}},
            recipe=recipe,
            budget=budget,
            goals=goals,
            decompress=args.decompress and budget["decompress_steps"] > 0,
            visual_input=args.visual_input or preset_visual_input(preset),
            lora=bool(recipe.get("stage2", {}).get("lora", True)),
        )

    def section(self, name: str) -> dict:
        """The recipe's section `name` (`stage0`, `stage1`, `stage2`), empty if the recipe has none."""
        return self.recipe.get(name) or {}


# The reusable stages in pipeline order and their folders under the run; the first folder is the one
# named in errors. Settings of later stages include those of earlier ones (see `stage_settings`).
STAGE_FOLDERS = {
    "stage0_text_lm": (TEXT_LM_DIR,),
    "stage1_tokenizer": (VISION_TOKENIZER_DIR, STAGE1_DIR, LLM_DIR),  # llm/: the LLM a dual stage I trained
    "code_datasets": (f"{STAGE2_DIR}/base", CODES_DIR),
    "stage2_decompress": (f"{STAGE2_DIR}/decompress",),
    "stage2_sft": (f"{STAGE2_DIR}/sft", MLLM_DIR),
}
STAGE_RECORDS = DEMO_STAGES_FILE


def _without(section: dict, *keys: str) -> dict:
    return {k: v for k, v in section.items() if k not in keys}


def stage_settings(args: DemoArguments, plan: DemoPlan) -> dict[str, dict]:
    """stage -> the settings its output depends on, as they read back from `STAGE_RECORDS`. Each stage's
    settings contain those of the stages it builds on, so a change upstream invalidates it too. Recipe
    sections are recorded without the keys the demo's budget sets instead."""
    preset, budget, decompress = plan.preset, plan.budget, plan.decompress
    settings: dict[str, dict] = {}
    # The data is code, not a setting: its fingerprints stand in for it, so a folder trained on what an
    # older version generated is refused like one made with other settings.
    upstream = {
        "preset": args.preset,
        "seed": args.seed,
        "text_model": preset["text_model"],
        "shapes_world_sha256": shapes_world_fingerprint(),
    }
    if args.llm is not None:
        upstream = settings["stage0_text_lm"] = {**upstream, "llm": str(args.llm)}
    elif preset["text_model"].get("source") == "gguf":  # stage 0 dequantizes it
        upstream = settings["stage0_text_lm"] = dict(upstream)
    elif preset["text_model"].get("source") == "stage0":
        upstream = settings["stage0_text_lm"] = {
            **upstream,
            "text_scenes": budget["text_scenes"],
            "stage0_steps": budget["stage0_steps"],
            "recipe_stage0": recipe_training_settings(plan.section("stage0")),
        }
    upstream = settings["stage1_tokenizer"] = {
        **upstream,
        **{k: budget[k] for k in ("stage1_steps", "stage1_train_images", "stage1_eval_images")},
        "vision_tokenizer": {**preset["vision_tokenizer"], **args.vision_overrides},
        "stage1_overrides": args.stage1_overrides,
        "paradigm": args.paradigm,
        "quantizer": args.quantizer,
        "codebook_size": args.codebook_size,
        "recipe_stage1": _without(plan.section("stage1"), "max_steps"),
    }
    upstream = settings["code_datasets"] = {**upstream, "visual_input": plan.visual_input}
    stage2 = plan.section("stage2")
    shared = {
        "task_rows_sha256": task_rows_fingerprint(),
        "stage2_train_images": budget["stage2_train_images"],
        "stage2_eval_images": budget["stage2_eval_images"],
        "recipe_stage2": _without(stage2, "train_images", "eval_images", "decompress", "sft"),
    }
    if decompress:
        upstream = settings["stage2_decompress"] = {
            **upstream,
            **shared,
            "decompress_steps": budget["decompress_steps"],
            "recipe_stage2_decompress": _without(stage2.get("decompress", {}), "max_steps"),
        }
    settings["stage2_sft"] = {
        **upstream,
        **shared,
        "decompression_pretraining": decompress,
        "sft_steps": budget["sft_steps"],
        "recipe_stage2_sft": _without(stage2.get("sft", {}), "max_steps"),
    }
    return json.loads(json.dumps(settings))


def stage_records(run: Path) -> dict[str, dict]:
    path = Path(run) / STAGE_RECORDS
    return json.loads(path.read_text()) if path.is_file() else {}


def record_stage(run: Path, stage: str, settings: dict) -> None:
    atomic_write_json(Path(run) / STAGE_RECORDS, {**stage_records(run), stage: settings})


def copy_stage_record(source: Path, destination: Path, stage: str) -> None:
    """For a stage's folders copied from run `source` into run `destination` (the ablation): the
    settings they were made with go along, so `destination` may reuse them."""
    records = stage_records(source)
    if stage in records:
        record_stage(destination, stage, records[stage])


def started_key(stage: str) -> str:
    """The record of a stage's settings written when it starts: an interrupted stage resumes from its
    checkpoints, so those must have been made with the settings of the run that resumes them."""
    return f"{stage} (started)"


def check_reusable(run: Path, settings: dict[str, dict], made: dict[str, bool]) -> None:
    """Every stage whose output is already made must have been made with `settings`: a folder made
    otherwise is neither reused (the report would claim settings it was not made with) nor replaced
    (it may hold hours of training), so the run stops before any work and says what to do. The same
    holds for an interrupted stage's partial folder, which the run would resume from."""
    records = stage_records(run)
    for stage, wanted in settings.items():
        folder = run / STAGE_FOLDERS[stage][0]
        if not made[stage]:
            started = records.get(started_key(stage))
            partial = [str(run / name) for name in STAGE_FOLDERS[stage] if (run / name).exists()]
            if started is None or started == wanted or not partial:
                continue
            raise DemoSettingsError(
                f"{stage}: an interrupted run of it left {', '.join(partial)}, started with other settings: "
                + "; ".join(setting_differences(started, wanted))
                + ". Its checkpoints are kept, not resumed. Use a new "
                f"output folder (--output), or delete {', '.join(partial)} to start {stage} afresh."
            )
        if stage not in records:
            problem = (
                f"{folder} is complete but {run / STAGE_RECORDS} has no record of the settings it was made with "
                "(made by an older version?)"
            )
        elif records[stage] != wanted:
            problem = f"{folder} was made with other settings: " + "; ".join(
                setting_differences(records[stage], wanted)
            )
        else:
            continue
        later = list(STAGE_FOLDERS)[list(STAGE_FOLDERS).index(stage) :]
        stale = [str(run / name) for s in later for name in STAGE_FOLDERS[s] if (run / name).exists()]
        raise DemoSettingsError(
            f"{stage}: {problem}. It is kept, not reused. Use a new output folder (--output), or delete "
            f"{', '.join(stale)} to retrain {stage} and the stages after it."
        )


def _versions() -> dict:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for name in ("torch", "transformers", "datasets", "accelerate", "trl", "peft", "evaluate", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


class StageClock:
    """Wall seconds per stage; a stage whose output was already complete is marked reused and keeps
    the seconds measured when it ran (from the previous report)."""

    def __init__(self, previous: Optional[dict] = None, quiet: bool = False):
        self.previous = previous or {}
        self.seconds: dict[str, float] = {}
        self.reused: dict[str, bool] = {}
        self.quiet = quiet

    def run(self, name: str, done: bool, work: Callable[[], Any]) -> Any:
        if not self.quiet:
            print(f"== {name}" + (" (reused: already complete)" if done else ""), flush=True)
        started = time.perf_counter()
        result = work()
        elapsed = time.perf_counter() - started
        self.reused[name] = done
        self.seconds[name] = float(self.previous.get(name, elapsed)) if done else elapsed
        return result


def train_stage0(run: Path, plan: DemoPlan, seed: int) -> Path:
    texts = list(text_corpus(num_scenes=plan.budget["text_scenes"], seed=seed))
    return train_text_lm(
        run / TEXT_LM_DIR,
        plan.preset["text_model"],
        texts,
        max_steps=plan.budget["stage0_steps"],
        seed=seed,
        **recipe_training_settings(plan.section("stage0")),
    )


def train_stage1(
    run: Path,
    plan: DemoPlan,
    llm_path: Path,
    seed: int,
    *,
    paradigm=None,
    quantizer=None,
    codebook_size=None,
    vision_overrides=None,
    stage1_overrides=None,
) -> dict:
    """Stage I through `StageITrainer`, with the recipe's `stage1` values, then `stage1_overrides`, and the demo's
    budget."""
    budget = plan.budget
    size = {**plan.preset["vision_tokenizer"], **(vision_overrides or {})}["image_size"]
    train = build_split("train", budget["stage1_train_images"], image_size=size, seed=seed)
    validation = build_split("validation", budget["stage1_eval_images"], image_size=size, seed=seed)
    args = StageIArguments.from_recipe(
        run,
        llm_path,
        plan.preset_name,
        paradigm=paradigm,
        quantizer=quantizer,
        codebook_size=codebook_size,
        max_steps=budget["stage1_steps"],
        warmup_steps=min(
            plan.section("stage1").get("warmup_steps", StageIArguments.warmup_steps), budget["stage1_steps"]
        ),
        seed=seed,
        eval_images=budget["stage1_eval_images"],
        vision_overrides=dict(vision_overrides or {}),
        **(stage1_overrides or {}),
    )
    text_blocks = None
    if args.codebook_learning.paradigm == "dual":
        _, tokenizer = load_text_lm(str(llm_path))
        text_blocks = packed_blocks(tokenizer, list(text_corpus(num_scenes=500, seed=seed)), 64)
    return StageITrainer(
        args,
        images_to_uint8(train["image"], size, "train"),
        images_to_uint8(validation["image"], size, "validation"),
        text_blocks=text_blocks,
    ).train(resume=True)


def _stage1_metrics(run: Path) -> dict:
    path = run / STAGE1_DIR / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def stage2_arguments(
    run: Path,
    plan: DemoPlan,
    stage: str,
    seed: int,
    device: str,
    from_decompressed: Optional[bool] = None,
):
    return StageIIArguments.from_recipe(
        run,
        stage,
        plan.preset_name,
        max_steps=plan.budget[f"{stage}_steps"],
        train_images=plan.budget["stage2_train_images"],
        eval_images=plan.budget["stage2_eval_images"],
        seed=seed,
        resume=True,
        use_cpu=device == "cpu",
        from_decompressed=from_decompressed,
    )


def _stage2_done(run: Path, plan: DemoPlan, stage: str) -> bool:
    return stage_complete(run, stage, plan.lora)


# -- samples.png ----------------------------------------------------------------------------------


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def save_samples(examples: dict, path) -> Path:
    """`samples.png` from an evaluation's examples (`evaluate_model(...)["examples"]`): what the demo's run folder and
    `unicode-mllm evaluate --output` show, and what an export's model card displays."""
    recon = examples["reconstruction"]
    return atomic_save_image(
        samples_grid(
            [a for a, _ in recon],
            [b for _, b in recon],
            examples["generation"],
            examples["vqa"][:: max(1, len(examples["vqa"]) // 8)],
        ),
        path,
    )


def samples_grid(inputs, reconstructions, generated, answered, tile: int = 128, columns: int = 8):
    """One PNG: test inputs over their reconstructions, generated images over their prompts, and
    answered questions (image, question, prediction, truth)."""
    font, label_h = _font(11), 72
    rows = [
        ("input", [(im, None) for im in inputs[:columns]]),
        ("reconstruction", [(im, None) for im in reconstructions[:columns]]),
        ("generated", [(im, caption) for caption, im in generated[:columns]]),
        ("VQA", [(im, _vqa_label(q, pred, ans)) for im, q, ans, pred in answered[:columns]]),
    ]
    left = 96
    heights = [tile + (label_h if any(text for _, text in items) else 0) for _, items in rows]
    canvas = Image.new("RGB", (left + columns * tile, sum(heights) + 8), "white")
    draw = ImageDraw.Draw(canvas)
    y = 4
    for (name, items), height in zip(rows, heights):
        draw.text((4, y + tile // 2 - 6), name, fill="black", font=font)
        for i, (image, text) in enumerate(items):
            x = left + i * tile
            canvas.paste(image.convert("RGB").resize((tile - 4, tile - 4), Image.NEAREST), (x + 2, y + 2))
            if text:
                draw.multiline_text((x + 2, y + tile), _wrapped(text, 21, 5), fill="black", font=font, spacing=1)
        y += height
    return canvas


def _wrapped(text: str, width: int, max_lines: int) -> str:
    lines = []
    for part in text.split("\n"):
        lines += textwrap.wrap(part, width) or [""]
    return "\n".join(lines[:max_lines])


def _vqa_label(question: str, prediction: str, answer: str) -> str:
    verdict = "ok" if final_answer(prediction).lower() == answer.lower() else "truth: " + answer
    return f"Q: {question}\nA: {prediction} ({verdict})"


def answered_question(image, question: str, prediction: str, answer: str, side: int = 256):
    """`question.png`: the image enlarged, with its question, the model's answer and the truth printed below."""
    text = _wrapped(_vqa_label(question, prediction, answer), 40, 6)
    canvas = Image.new("RGB", (side + 8, side + 12 + 16 * (text.count("\n") + 1)), "white")
    canvas.paste(image.convert("RGB").resize((side, side), Image.NEAREST), (4, 4))
    ImageDraw.Draw(canvas).multiline_text((4, side + 8), text, fill="black", font=_font(13), spacing=2)
    return canvas


# -- report -----------------------------------------------------------------------------------------


def _goal_checks(metrics: dict, chance: dict, goals: dict, language: Optional[dict] = None) -> dict:
    checks = {}
    paths = {
        "psnr_db": ("reconstruction", "psnr"),
        "codebook_usage": ("reconstruction", "codebook_usage"),
        "vqa_accuracy": ("vqa", "accuracy"),
        "vqa_compositional_accuracy": ("vqa_compositional", "accuracy"),
        "vqa_one_shape_accuracy": ("vqa_one_shape", "accuracy"),
        "text_to_image_all_correct": ("text_to_image", "all_correct"),
    }
    for goal, target in goals.items():
        if goal == "vqa_above_chance_every_type":
            if target:
                checks[goal] = all(above_chance(metrics, chance, "vqa").values())
            continue
        if goal == "vqa_margin_over_chance_every_type":
            checks[goal] = all(above_chance(metrics, chance, "vqa", margin=float(target)).values())
            continue
        if goal == "vqa_margin_over_swapped_images":
            checks[goal] = bool(
                metrics["vqa"]["accuracy"] >= metrics["vqa_swapped_images"]["accuracy"] + float(target)
            )
            continue
        if goal == "text_perplexity_increase":
            checks[goal] = language is not None and bool(language["increase"] <= float(target))
            continue
        if goal not in paths:
            raise ValueError(
                f"unknown goal {goal!r} in the recipe's demo.goals; use some of {sorted(paths)}, "
                "vqa_above_chance_every_type, vqa_margin_over_chance_every_type, vqa_margin_over_swapped_images or "
                "text_perplexity_increase"
            )
        section, key = paths[goal]
        checks[goal] = bool(metrics[section][key] >= target)
    return checks


def report_markdown(report: dict) -> str:
    lines = [
        f"# UniCode demo — preset `{report['settings']['preset']}`",
        "",
        f"Run folder `{report['run_dir']}`; seed {report['settings']['seed']}; device {report['settings']['device']}; "
        f"total wall time {report['wall_seconds']['total']:.0f} s.",
        "",
        metrics_markdown(report),
        "",
        *_language_markdown(report.get("language")),
        "## Goals",
        "",
        "| goal | target | met |",
        "|---|---|---|",
    ]
    for goal, met in report["goals_met"].items():
        lines.append(f"| {goal} | {report['goals'][goal]} | {'yes' if met else 'no'} |")
    lines += ["", "## Wall time per stage (s)", "", "| stage | seconds | reused |", "|---|---|---|"]
    for stage, seconds in report["wall_seconds"].items():
        if stage != "total":
            lines.append(f"| {stage} | {seconds:.1f} | {'yes' if report['reused'].get(stage) else 'no'} |")
    example = report["example"]
    lines += [
        "",
        "## One answered question",
        "",
        f"Q: {example['question']}  ",
        f"A: {example['prediction']} (truth: {example['answer']})",
        "",
        f"Generated for '{example['prompt']}': `generated.png`.",
        "",
    ]
    return "\n".join(lines)


def _language_markdown(language: Optional[dict]) -> list[str]:
    if not language:
        return []
    return [
        "## Language kept (held-out English)",
        "",
        "| LLM | perplexity |",
        "|---|---|",
        f"| before stage I (the LLM the run starts from) | {language['perplexity_before']:.2f} |",
        f"| after stage II (the final MLLM, adapters merged) | {language['perplexity_after']:.2f} |",
        "",
        f"Change: {100 * language['increase']:+.1f} % on {language['tokens']} tokens of `{language['text']}`.",
        "",
        *(
            [
                "This run's LLM was trained from scratch in stage 0 on the Shapes world's text only: it never knew "
                "English, so these figures say nothing about language kept. They matter for a pretrained LLM "
                "(`--preset gemma-270m`, `--llm`).",
                "",
            ]
            if language.get("llm_from_scratch")
            else []
        ),
    ]


def _check_demo_process(args: DemoArguments) -> None:
    """Refuse, before any work, a demo that cannot run here: under a multi-process launcher, on a missing device,
    or with an unknown visual input."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        # Every rank would run every stage, evaluation and report on the same folder and race on its files.
        raise DemoSettingsError(
            f"the demo runs in one process, but this is one of {world_size} (accelerate launch / torchrun); run "
            "`unicode-mllm demo` without a launcher (--device cuda for one GPU), or train on several GPUs stage by "
            "stage: "
            "`accelerate launch -m training.cli train-tokenizer ...`, then `... train --stage sft ...`"
        )
    try:
        check_device(args.device)
    except ValueError as error:
        raise DemoSettingsError(str(error)) from None
    if args.llm is not None:
        try:
            check_llm_path(args.llm, "--llm")
        except ValueError as error:
            raise DemoSettingsError(str(error)) from None
    if args.visual_input is not None:
        try:
            check_visual_input(args.visual_input)
        except ValueError as error:
            raise DemoSettingsError(str(error)) from None


def _evaluate_run(run: Path, budget: dict, args: DemoArguments, llm: Path, from_scratch: bool) -> dict:
    """The demo's evaluation of the run's final MLLM (`evaluation.evaluate_on_shapes`) with the budget's counts,
    and its `language`: the perplexity on held-out English of the LLM the run started from (`llm`; `from_scratch`:
    trained by stage 0 on the Shapes world's text) and of the final MLLM (`language.text_perplexity`)."""
    text_model, tokenizer = load_text_lm(llm)
    before = text_perplexity(text_model.to(args.device), tokenizer)
    del text_model
    model, processor = load_model_and_processor(run / MLLM_DIR)
    model.to(args.device)
    counts = ("vqa_images", "compositional_images", "generation_prompts", "reconstruction_images", "usage_images")
    results = evaluate_on_shapes(
        model,
        processor,
        prior_scenes=budget["stage2_train_images"],
        seed=args.seed,
        guidance_scale=budget["guidance_scale"],
        **{k: budget[k] for k in counts},
    )
    language = language_kept(before, text_perplexity(model, processor.tokenizer))
    return {**results, "language": {**language, "llm_from_scratch": from_scratch}}


def _draw_examples(run: Path, examples: dict) -> tuple[str, str, str, str]:
    """question.png, generated.png and samples.png from the evaluation's examples; returns the answered question,
    its truth, the model's answer and the first generation prompt."""
    image, question, answer, prediction = examples["vqa"][0]
    prompt, generated = examples["generation"][0]
    atomic_save_image(answered_question(image, question, prediction, answer), run / QUESTION_FILE)
    atomic_save_image(generated, run / GENERATED_FILE)
    save_samples(examples, run / SAMPLES_FILE)
    return question, answer, prediction, prompt


def _demo_report(
    run: Path,
    args: DemoArguments,
    plan: DemoPlan,
    results: dict,
    stage1: Optional[dict],
    stage2: dict,
    clock: StageClock,
    started: float,
    example: tuple[str, str, str, str],
) -> dict:
    """report.json's content: the evaluation beside its chance and ceiling, the goals, each stage's figures, the
    settings the run used, its seconds and the software versions."""
    question, answer, prediction, prompt = example
    preset, budget, goals = plan.preset, plan.budget, plan.goals
    wall = dict(clock.seconds)
    wall["total"] = float(sum(wall.values()))  # the pipeline's cost, reused stages at their measured time
    wall["this_invocation"] = time.perf_counter() - started
    vq = UniCodeVisualTokenizerConfig.from_pretrained(run / VISION_TOKENIZER_DIR)
    report = {
        "run_dir": str(run),
        "metrics": results["metrics"],
        "chance": results["chance"],
        "ceiling": results["ceiling"],
        "counts": results["counts"],
        "goals": goals,
        "goals_met": _goal_checks(results["metrics"], results["chance"], goals, results["language"]),
        # Held-out English, not the Shapes world: beside the metrics, so the model card does not list it as one.
        "language": results["language"],
        "stage_metrics": {
            "stage1": {k: v for k, v in (stage1 or {}).items() if isinstance(v, (int, float))},
            **{f"stage2_{s}": {"before": m.get("before"), "after": m.get("after")} for s, m in stage2.items()},
        },
        "settings": {
            # The base LLM's Hub id (None: trained in stage 0, at <run>/text_lm): the model card names it.
            "preset": args.preset,
            "seed": args.seed,
            "device": args.device,
            "base_model": args.llm or preset["text_model"].get("name_or_path") or preset["text_model"].get("hub_id"),
            "text_model": preset["text_model"],
            "budget": budget,
            "visual_input": plan.visual_input,
            "decompression_pretraining": plan.decompress,
            "stage2": _without(plan.section("stage2"), "train_images", "eval_images", "decompress", "sft", "trainer"),
            "vision_tokenizer": {
                k: getattr(vq, k)
                for k in (
                    "image_size",
                    "quantizer",
                    "depth",
                    "codebook_size",
                    "code_grid_size",
                    "tokens_per_image",
                )
            },
            "paradigm": (stage1 or {}).get("paradigm"),  # how stage I learned the codebook (its metrics.json)
        },
        "wall_seconds": wall,
        "reused": clock.reused,
        "versions": _versions(),
        "example": {
            "question": question,
            "answer": answer,
            "prediction": prediction,
            "prompt": prompt,
            "question_image": QUESTION_FILE,
            "generated_image": GENERATED_FILE,
        },
    }
    return report


class DemoRun:
    """One demo run's jobs, in pipeline order: each stage trains unless its folder is finished and was made with
    the same settings (`demo_stages.json`), then the evaluation and the report. `run_demo` calls them in turn."""

    def __init__(self, args: DemoArguments):
        self.args = args
        self.run = Path(args.output_dir)
        self.run.mkdir(parents=True, exist_ok=True)
        self.plan = DemoPlan.resolve(args)
        previous = {}
        if (self.run / REPORT_FILE).is_file():
            previous = json.loads((self.run / REPORT_FILE).read_text()).get("wall_seconds", {})
        self.clock = StageClock(previous, quiet=args.quiet)
        self.started = time.perf_counter()
        self.settings = stage_settings(args, self.plan)
        self.made = {
            **{
                s: is_complete(self.run / STAGE_FOLDERS[s][0])
                for s in ("stage0_text_lm", "stage1_tokenizer", "code_datasets")
            },
            **{f"stage2_{s}": _stage2_done(self.run, self.plan, s) for s in ("decompress", "sft")},
        }
        check_reusable(self.run, self.settings, self.made)

    def stage(self, name: str, done: bool, work: Callable[[], Any]) -> Any:
        if not done:
            record_stage(self.run, started_key(name), self.settings[name])
        result = self.clock.run(name, done, work)
        # Recorded only once the work has returned: a record always describes a finished folder.
        if not done:
            record_stage(self.run, name, self.settings[name])
        return result

    def text_lm(self) -> tuple[Path, bool]:
        """Stage 0: the LLM trained from scratch on the Shapes world's text, or a pretrained one read into the run.
        Returns its folder and whether it was trained here."""
        args, preset = self.args, self.plan.preset
        trains_stage0 = (
            args.llm is None and preset["text_model"].get("source") == "stage0" and "stage0_text_lm" in self.settings
        )
        if "stage0_text_lm" not in self.settings:
            return Path(preset["text_model"]["name_or_path"]), False
        llm = self.stage(
            "stage0_text_lm",
            self.made["stage0_text_lm"],
            lambda: (
                train_stage0(self.run, self.plan, args.seed)
                if trains_stage0
                else pretrained_text_lm(preset["text_model"], self.run / TEXT_LM_DIR, args.llm)
            ),
        )
        return Path(llm), trains_stage0

    def tokenizer(self, llm: Path) -> dict:
        """Stage I; returns its metrics. A finished vision_tokenizer/ is never retrained nor re-exported: the
        ablation's separate-codebook variant rewrites it after stage I."""
        args, done = self.args, self.made["stage1_tokenizer"]
        return self.stage(
            "stage1_tokenizer",
            done,
            lambda: (
                _stage1_metrics(self.run)
                if done
                else train_stage1(
                    self.run,
                    self.plan,
                    llm,
                    args.seed,
                    paradigm=args.paradigm,
                    quantizer=args.quantizer,
                    codebook_size=args.codebook_size,
                    vision_overrides=args.vision_overrides,
                    stage1_overrides=args.stage1_overrides,
                )
            ),
        )

    def code_datasets(self, llm: Path) -> None:
        """The assembled base MLLM, and the Shapes scenes encoded once as code datasets. They are cached per image
        count and seed (and checked against the tokenizer), so a checked stage2/base with missing codes only
        encodes them."""
        args, budget = self.args, self.plan.budget

        def codes():
            model, _ = load_model_and_processor(
                assemble_base(self.run, args.preset, llm=args.llm and str(llm), visual_input=self.plan.visual_input)
            )
            shapes_code_datasets(
                self.run, model, budget["stage2_train_images"], budget["stage2_eval_images"], args.seed
            )

        cached = (self.run / CODES_DIR / f"train-{budget['stage2_train_images']}-s{args.seed}").is_dir()
        self.stage("code_datasets", self.made["code_datasets"] and cached, codes)

    def stage2(self) -> dict:
        """Decompression pre-training (unless the budget skips it), then instruction tuning; returns their metrics.
        The run's adapter, if stage II trained LoRA, is published at <run>/adapter, where hub_upload looks (its
        base: stage2/decompress/model); a fully fine-tuned run has none, and a stale copy from an earlier LoRA run
        must not pass for one."""
        plan, args = self.plan, self.args
        metrics = {}
        for name in ("decompress", "sft") if plan.decompress else ("sft",):
            metrics[name] = self.stage(
                f"stage2_{name}",
                self.made[f"stage2_{name}"],
                lambda name=name: train_stage2(
                    stage2_arguments(self.run, plan, name, args.seed, args.device, from_decompressed=plan.decompress)
                ),
            )
        shutil.rmtree(self.run / ADAPTER_DIR, ignore_errors=True)
        if plan.lora and is_complete(self.run / STAGE2_DIR / "sft" / ADAPTER_DIR):
            shutil.copytree(self.run / STAGE2_DIR / "sft" / ADAPTER_DIR, self.run / ADAPTER_DIR)
        return metrics

    def evaluate_and_report(self, llm: Path, from_scratch: bool, stage1: dict, stage2: dict) -> dict:
        """The evaluation, the pictures and report.json / report.md; returns the report."""
        run, args = self.run, self.args
        results = self.clock.run(
            "evaluation", False, lambda: _evaluate_run(run, self.plan.budget, args, llm, from_scratch)
        )
        question, answer, prediction, prompt = _draw_examples(run, results["examples"])
        report = _demo_report(
            run,
            args,
            self.plan,
            results,
            stage1,
            stage2,
            self.clock,
            self.started,
            example=(question, answer, prediction, prompt),
        )
        atomic_write_json(run / REPORT_FILE, report)
        atomic_write_text(run / REPORT_MARKDOWN_FILE, report_markdown(report))
        if not args.quiet:
            print(f"\nQ: {question}\nA: {prediction}   (truth: {answer}; image: {run / QUESTION_FILE})")
            print(f"generated for '{prompt}': {run / GENERATED_FILE}")
            print(f"report: {run / REPORT_MARKDOWN_FILE}")
        return report


def run_demo(args: DemoArguments) -> dict:
    """The whole pipeline on `args.output_dir`; returns the report (also written as report.json)."""
    _check_demo_process(args)
    demo = DemoRun(args)
    llm, from_scratch = demo.text_lm()
    stage1 = demo.tokenizer(llm)
    demo.code_datasets(llm)
    stage2 = demo.stage2()
    return demo.evaluate_and_report(llm, from_scratch, stage1, stage2)


__all__ = [
    "BUDGET_KEYS",
    "DemoArguments",
    "DemoPlan",
    "DemoSettingsError",
    "demo_budget",
    "run_demo",
    "train_stage0",
    "train_stage1",
    "stage2_arguments",
    "samples_grid",
    "report_markdown",
    "StageClock",
    "STAGE_FOLDERS",
    "STAGE_RECORDS",
    "stage_settings",
    "stage_records",
    "record_stage",
    "copy_stage_record",
    "check_reusable",
]
