"""`unicode-mllm`: the command line. Each stage adds its subcommand here.

unicode-mllm demo [--preset tiny|small] [--output outputs/demo-tiny] [--device cpu|cuda]   # the whole pipeline
                  [--paradigm frozen|dual|iterative] [--quantizer vq|rq|hq] [--entropy-weight W]
unicode-mllm ablate [--output outputs/ablate] [--factors paradigm quantizer ...]       # the paper's ablations, small
unicode-mllm evaluate --model outputs/demo-tiny/mllm [--adapter DIR] [--dtype bfloat16] [--output DIR]
                                                  # the demo's metrics, any model
unicode-mllm presets [NAME]
unicode-mllm train-text --preset tiny --output outputs/tiny
unicode-mllm train-tokenizer --preset tiny --paradigm iterative --quantizer rq --output outputs/tiny
unicode-mllm train-tokenizer --images my_photos/ [--init-from outputs/tiny/vision_tokenizer] ...  # your images
unicode-mllm train --stage decompress --preset tiny --output outputs/tiny
unicode-mllm train --stage sft --preset tiny --output outputs/tiny        # -> outputs/tiny/mllm
unicode-mllm merge --adapter outputs/tiny/stage2/sft/adapter --output merged/
unicode-mllm finetune --model outputs/tiny/mllm --dataset my_photos/ --output my_lora/
                      [--image-column C] [--text-column C]
unicode-mllm export outputs/tiny exports/unicode-tiny [--max-shard-size 5GB] [--adapter | --adapter-only]
unicode-mllm push exports/unicode-tiny --repo-id NAME/unicode-tiny [--private] [--revision REV] [--dry-run]
"""

from __future__ import annotations

# The command handlers import their stage's modules when they run, not here: torch, transformers, TRL and PEFT take
# seconds to load, and `unicode-mllm --help` or a mistyped flag should answer at once. Everywhere else in the
# package imports sit at the top.
import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from hub_upload.run_folder import (
    ADAPTER_DIR,
    LLM_DIR,
    MLLM_DIR,
    SAMPLES_FILE,
    STAGE1_DIR,
    STAGE2_DIR,
    TEXT_LM_DIR,
    VISION_TOKENIZER_DIR,
)


def _cmd_presets(args: argparse.Namespace) -> int:
    from .presets import list_presets, load_preset

    if args.name:
        print(json.dumps(load_preset(args.name), indent=2))
    else:
        print("\n".join(list_presets()))
    return 0


def positive_int(text: str) -> int:
    """argparse type of counts and step flags: refused at the door, before any model loads (a negative step
    count would otherwise train for the trainer's epochs, or save an untrained model marked complete)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def model_reference(text: str) -> str:
    """argparse type of --model / --llm / --adapter ...: a local file or folder, or a Hub repo id. A missing local
    path is named here instead of being sent to the Hub, which would answer with a repo-id format error."""
    from .text_lm import looks_local

    if looks_local(text) and not Path(text).expanduser().exists():
        raise argparse.ArgumentTypeError(f"no such file or folder: {text!r} (a Hub repo id is NAME or OWNER/NAME)")
    return text


def llm_reference(text: str) -> str:
    """argparse type of every --llm: an existing causal-LM folder or .gguf, or a Hub repo id (`check_llm_path`)."""
    from .text_lm import check_llm_path

    try:
        return check_llm_path(text, argument="")
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _pick(flag, recipe: dict, key: str, default):
    return flag if flag is not None else recipe.get(key, default)


def _cmd_train_text(args: argparse.Namespace) -> int:
    from .data.shapes import text_corpus
    from .presets import load_preset, load_recipe
    from .text_lm import pretrained_text_lm, recipe_training_settings, train_text_lm

    preset, recipe = load_preset(args.preset), load_recipe(args.preset)
    if args.llm or preset["text_model"].get("source") != "stage0":
        # A pretrained LLM: nothing to train; a GGUF becomes the run's text_lm/ folder here (once).
        llm = pretrained_text_lm(preset["text_model"], Path(args.output) / TEXT_LM_DIR, args.llm)
        print(f"text LM: {llm} (pretrained; nothing to train)")
        return 0
    stage0, data = recipe.get("stage0", {}), recipe.get("data", {})
    texts = list(text_corpus(num_scenes=_pick(args.scenes, data, "text_scenes", 4000), seed=args.seed))
    out = train_text_lm(
        Path(args.output) / TEXT_LM_DIR,
        preset["text_model"],
        texts,
        max_steps=_pick(args.steps, stage0, "max_steps", 300),
        seed=args.seed,
        **recipe_training_settings(stage0),
    )
    print(f"text LM: {out}")
    return 0


# Visual-tokenizer config fields a command line may override: flag --entropy-weight sets `entropy_weight`.
VISION_FLAGS = {
    "norm_handling": dict(choices=["normalize", "none"]),
    "entropy_weight": dict(
        type=float, help="MAGVIT-v2 entropy term for codebook usage (default 0: off; see docs/results.md)"
    ),
    "entropy_temperature": dict(type=float, help="its softmax temperature (default 0.1)"),
}


def _add_vision_flags(parser: argparse.ArgumentParser, names) -> None:
    for name in names:
        parser.add_argument("--" + name.replace("_", "-"), **VISION_FLAGS[name])


def _vision_flags(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in VISION_FLAGS if getattr(args, name, None) is not None}


def _cmd_train_tokenizer(args: argparse.Namespace) -> int:
    from .checkpointing import is_complete
    from .data.shapes import build_split, text_corpus
    from .presets import load_preset, load_recipe
    from .stage1 import StageIArguments, StageITrainer, images_to_uint8
    from .text_lm import load_text_lm, packed_blocks, pretrained_text_lm

    preset, recipe = load_preset(args.preset), load_recipe(args.preset)
    data = recipe.get("data", {})
    output = Path(args.output)
    if args.resume and is_complete(output / VISION_TOKENIZER_DIR):
        print(f"stage I already finished: {output / 'vision_tokenizer'} (delete it to train again)")
        return 0
    if preset["text_model"].get("source") == "stage0" and not args.llm:
        if not (output / TEXT_LM_DIR).is_dir():
            raise SystemExit(
                f"no text LM at {output / 'text_lm'}: run `unicode-mllm train-text --preset {args.preset} "
                f"--output {args.output}` first, or pass --llm"
            )
        llm_path = str(output / TEXT_LM_DIR)
    else:
        llm_path = pretrained_text_lm(preset["text_model"], output / TEXT_LM_DIR, args.llm)
    image_size = preset["vision_tokenizer"]["image_size"]
    if args.init_from:
        from modeling_unicode import UniCodeVisualTokenizerConfig

        image_size = UniCodeVisualTokenizerConfig.from_pretrained(args.init_from).image_size
    if args.images:  # the user's images; a tenth (at least one) held out for the validation PSNR
        images = _user_images(args, "train-tokenizer")
        if images is None:
            return 2
        images = images.select(range(min(len(images), args.train_images or len(images))))
        held_out = max(1, len(images) // 10) if len(images) > 1 else 0
        pixels = images_to_uint8(images[args.image_column], image_size, str(args.images))
        train_images, eval_images = (
            pixels[: len(pixels) - held_out],
            pixels[len(pixels) - held_out :] if held_out else pixels,
        )
    else:
        num_train = _pick(args.train_images, data, "train_images", 8000)
        num_val = data.get("validation_images", 256)
        train = build_split("train", num_train, image_size=image_size, seed=args.seed)
        validation = build_split("validation", num_val, image_size=image_size, seed=args.seed)
        train_images = images_to_uint8(train["image"], image_size, "train")
        eval_images = images_to_uint8(validation["image"], image_size, "validation")
    text_blocks = None
    stage_args = StageIArguments.from_recipe(
        output,
        llm_path,
        args.preset,
        paradigm=args.paradigm,
        quantizer=args.quantizer,
        depth=args.depth,
        codebook_size=args.codebook_size,
        max_steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        bf16=False if args.fp32 else None,
        seed=args.seed,
        gan_weight=args.gan_weight,
        cell_colour_weight=args.cell_colour_weight,
        dead_code_threshold=args.dead_code_threshold,
        cell_colour_resolution=args.cell_colour_resolution,
        edge_weight=args.edge_weight,
        vision_overrides=_vision_flags(args),
        init_from=args.init_from,
    )
    if stage_args.codebook_learning.paradigm == "dual":
        _, tokenizer = load_text_lm(llm_path)
        text_blocks = packed_blocks(tokenizer, list(text_corpus(num_scenes=2000, seed=args.seed)), 64)
    metrics = StageITrainer(stage_args, train_images, eval_images, text_blocks=text_blocks).train(resume=args.resume)
    print(json.dumps(metrics, indent=2))
    return 0


def _add_image_data_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--split", default="train")
    parser.add_argument(
        "--image-column", default="image", help="the column holding images or image paths (default image)"
    )


# -- stage II: train --stage decompress|sft, merge, finetune --------------------------------------
def _cmd_train_stage2(args: argparse.Namespace) -> int:
    from .stage2 import StageIIArguments, train_stage2

    metrics = train_stage2(
        StageIIArguments.from_recipe(
            args.output,
            args.stage,
            args.preset,
            llm=args.llm,
            max_steps=args.steps,
            batch_size=args.batch_size,
            learning_rate=args.lr,
            lora_r=args.lora_r,
            target_modules=args.target_modules,
            segments=args.segments,
            caption_drop=args.caption_drop,
            train_images=args.train_images,
            eval_images=args.eval_images,
            save_steps=args.save_steps,
            lora=args.lora,
            seed=args.seed,
            resume=args.resume,
            use_cpu=True if args.cpu else None,
        )
    )
    print(
        json.dumps({k: metrics.get(k) for k in ("before", "after", "global_step", "resumed_from", "merged")}, indent=2)
    )
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from .sft import merge_adapter

    print(f"merged: {merge_adapter(args.adapter, args.output, base=args.base)}")
    return 0


def _user_images(args: argparse.Namespace, command: str):
    """`--images` / `--dataset` loaded (the accepted layouts), or None after one error line naming the fix."""
    from .data.real_images import load_image_dataset

    try:
        return load_image_dataset(
            args.dataset if command == "finetune" else args.images, args.split, image_column=args.image_column
        )
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"unicode-mllm {command}: error: {error}", file=sys.stderr)
        return None


def _cmd_finetune(args: argparse.Namespace) -> int:
    from .finetune import finetune_lora

    data = _user_images(args, "finetune")
    if data is None:
        return 2
    metrics = finetune_lora(
        args.model,
        data,
        args.output,
        max_steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        lora_r=args.lora_r,
        target_modules=args.target_modules,
        image_column=args.image_column,
        text_column=args.text_column,
        merge=args.merge,
        resume=args.resume,
    )
    print(json.dumps({k: metrics.get(k) for k in ("train_loss", "global_step", "adapter", "merged")}, indent=2))
    return 0


def _add_stage2_parsers(sub) -> None:
    train = sub.add_parser(
        "train", help="stage II: --stage decompress (pre-training) or sft (instruction tuning), LoRA or full"
    )
    train.add_argument("--stage", choices=["decompress", "sft"], required=True)
    train.add_argument("--preset", default="tiny")
    train.add_argument(
        "--output", default="outputs/tiny", help="the run folder (holds vision_tokenizer/ from stage I)"
    )
    train.add_argument(
        "--llm",
        type=llm_reference,
        help="causal LM folder, repo id or .gguf file (dequantized once into OUTPUT/text_lm); default: OUTPUT/llm, "
        "the preset's, or OUTPUT/text_lm",
    )
    for flag, kind in (
        ("--steps", positive_int),
        ("--batch-size", positive_int),
        ("--lr", float),
        ("--lora-r", positive_int),
        ("--segments", positive_int),
        ("--caption-drop", float),
        ("--train-images", positive_int),
        ("--eval-images", positive_int),
        ("--save-steps", positive_int),
    ):
        train.add_argument(flag, type=kind)
    train.add_argument("--target-modules", nargs="+", help="LLM linear layers to adapt (default: all of them)")
    train.add_argument(
        "--lora",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="LoRA adapter (--lora) or full fine-tuning of the LLM decoder (--no-lora); default: the recipe's "
        "stage2.lora",
    )
    train.add_argument("--resume", action="store_true", help="continue from the last COMPLETE checkpoint")
    _add_overwrite_flag(train, f"the stage's {STAGE2_DIR}/STAGE/ (and {MLLM_DIR}/ for sft)")
    train.add_argument("--cpu", action="store_true", help="train on CPU even where CUDA is available")
    train.add_argument("--seed", type=int, default=0)
    train.set_defaults(func=_cmd_train_stage2)

    merge = sub.add_parser("merge", help="fold a LoRA adapter into its base model (HF folder with processor)")
    merge.add_argument("--adapter", required=True, type=model_reference)
    merge.add_argument("--output", required=True)
    merge.add_argument(
        "--base", type=model_reference, help="base model folder (default: the adapter's base_model_name_or_path)"
    )
    _add_overwrite_flag(merge, "OUTPUT, if an earlier merge wrote it")
    merge.set_defaults(func=_cmd_merge)

    tune = sub.add_parser(
        "finetune", help="LoRA fine-tune of a UniCode model on your images (README: layouts and columns)"
    )
    tune.add_argument("--model", required=True, type=model_reference, help="UniCode model folder or Hub repo id")
    tune.add_argument(
        "--dataset",
        required=True,
        help="imagefolder (metadata.jsonl/.csv), JSON/JSONL/CSV file of image "
        "paths, save_to_disk folder, or Hub dataset name",
    )
    _add_image_data_flags(tune)
    tune.add_argument(
        "--text-column",
        help="text-to-image captions (default: the first of caption, text, ... present); "
        "rows with a 'messages' conversation train on it instead",
    )
    tune.add_argument("--output", required=True)
    tune.add_argument("--steps", type=positive_int, default=100)
    tune.add_argument("--batch-size", type=positive_int, default=8)
    tune.add_argument("--lr", type=float, default=2e-4)
    tune.add_argument("--lora-r", type=positive_int, default=16)
    tune.add_argument("--target-modules", nargs="+")
    tune.add_argument("--merge", action="store_true", help="also save the merged model to OUTPUT/merged")
    tune.add_argument(
        "--resume",
        action="store_true",
        help="continue from the last COMPLETE checkpoint in OUTPUT/trainer (a run that was stopped or killed)",
    )
    _add_overwrite_flag(tune, f"OUTPUT/trainer, OUTPUT/{ADAPTER_DIR} and OUTPUT/merged")
    tune.set_defaults(func=_cmd_finetune)


# -- hub_upload: export / push (thin wrappers; the work is in hub_upload) ---------------------------
def _cmd_export(args: argparse.Namespace) -> int:
    from hub_upload.export import export_adapter, export_run

    try:
        if args.adapter_only:
            out = export_adapter(args.run_dir, args.out_dir, overwrite=args.overwrite)
        else:
            out = export_run(
                args.run_dir,
                args.out_dir,
                max_shard_size=args.max_shard_size,
                repo_id=args.repo_id,
                base_model=args.base_model,
                base_model_license=args.base_model_license,
                include_adapter=args.adapter,
                overwrite=args.overwrite,
            )
    except (ValueError, TypeError) as error:
        print(f"unicode-mllm export: error: {error}", file=sys.stderr)
        return 2
    print(f"exported {args.run_dir} -> {out}")
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    from hub_upload.push import PushError, push_folder

    try:
        result = push_folder(
            args.folder,
            args.repo_id,
            private=args.private,
            revision=args.revision,
            dry_run=args.dry_run,
            commit_message=args.message,
        )
    except (ValueError, TypeError, PushError) as error:
        print(f"unicode-mllm push: error: {error}", file=sys.stderr)
        return 2
    print(result.summary())
    return 0


def _add_hub_commands(sub) -> None:
    export = sub.add_parser(
        "export", help="turn a trained run folder into a Hub repository folder (remote code, model card)"
    )
    export.add_argument("run_dir", help="run folder with mllm/, report.json, samples.png")
    export.add_argument("out_dir", help="new folder to write")
    export.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (default 5GB)")
    export.add_argument("--repo-id", help="repository the model card's snippets load from")
    export.add_argument("--base-model", help="base LLM repo id (default: the report's settings)")
    export.add_argument(
        "--base-model-license", help="its licence, stated on the card (default: known for preset LLMs)"
    )
    group = export.add_mutually_exclusive_group()
    group.add_argument("--adapter", action="store_true", help="also copy the run's LoRA adapter into adapter/")
    group.add_argument("--adapter-only", action="store_true", help="export only the LoRA adapter (PEFT format)")
    export.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    export.set_defaults(func=_cmd_export)

    push = sub.add_parser("push", help="upload an exported folder to the Hub in one commit (HF_ENDPOINT honoured)")
    push.add_argument("folder", help="folder written by `unicode-mllm export`")
    push.add_argument("--repo-id", required=True, help="NAME or OWNER/NAME")
    push.add_argument("--private", action="store_true")
    push.add_argument("--revision", help="branch to commit to (default main; created if missing)")
    push.add_argument("--message", help="commit message")
    push.add_argument("--dry-run", action="store_true", help="list what would be uploaded; contact no server")
    push.set_defaults(func=_cmd_push)


# -- end hub_upload ---------------------------------------------------------------------------------


# -- demo / ablate (the work is in training/demo.py and training/ablate.py) ----------------------
_BUDGET_FLAGS = (
    ("--stage0-steps", int),
    ("--stage1-steps", int),
    ("--decompress-steps", int),
    ("--sft-steps", int),
    ("--stage1-train-images", int),
    ("--stage2-train-images", int),
    ("--vqa-images", int),
    ("--generation-prompts", int),
    ("--guidance-scale", float),
)


def _budget_flags(args: argparse.Namespace) -> dict:
    return {
        f[2:].replace("-", "_"): getattr(args, f[2:].replace("-", "_"))
        for f, _ in _BUDGET_FLAGS
        if getattr(args, f[2:].replace("-", "_")) is not None
    }


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoArguments, DemoSettingsError, run_demo

    output = args.output or f"outputs/demo-{args.preset}"
    try:
        run_demo(
            DemoArguments(
                output_dir=output,
                preset=args.preset,
                seed=args.seed,
                device=args.device,
                budget=_budget_flags(args),
                llm=args.llm,
                paradigm=args.paradigm,
                quantizer=args.quantizer,
                vision_overrides=_vision_flags(args),
            )
        )
    except DemoSettingsError as error:
        print(f"unicode-mllm demo: error: {error}", file=sys.stderr)
        return 2
    return 0


def _cmd_ablate(args: argparse.Namespace) -> int:
    from .ablate import FACTORS, run_ablation
    from .demo import DemoSettingsError

    try:
        table = run_ablation(
            args.output,
            preset=args.preset,
            factors=args.factors or list(FACTORS),
            seed=args.seed,
            device=args.device,
            budget=_budget_flags(args),
        )
    except DemoSettingsError as error:
        print(f"unicode-mllm ablate: error: {error}", file=sys.stderr)
        return 2
    print(table["markdown"])
    return 0


# -- evaluate: the demo's evaluation of any UniCode MLLM ---------------------------------------------
# Flags of `evaluate_on_shapes`'s keywords; unset ones keep its defaults (the tiny demo's budget).
_EVALUATE_COUNTS = (
    "vqa_images",
    "compositional_images",
    "generation_prompts",
    "reconstruction_images",
    "usage_images",
    "prior_scenes",
)


def _unicode_model_problem(model: str) -> str | None:
    """Why `model` (a folder or repo id) cannot be evaluated, or None; a name that is no folder here is
    left to `from_pretrained` as a repo id."""
    from hub_upload.run_folder import missing_mllm_parts

    folder = Path(model)
    if not folder.exists():
        return None
    missing = missing_mllm_parts(folder, shown_as=model.rstrip("/"))
    if missing:
        return (
            f"--model {model} is not a UniCode MLLM folder; it lacks {'; '.join(missing)}. Point it at a demo run's "
            "mllm/, a merged adapter, an `unicode-mllm export` folder, or a Hub repo id"
        )
    return None


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import torch

    from .checkpointing import atomic_write_json, atomic_write_text
    from .demo import save_samples
    from .evaluation import check_device, check_evaluation_settings, evaluate_on_shapes, metrics_markdown
    from .sft import require_adapter_folder
    from .stage2 import load_model_and_processor

    counts = {name: getattr(args, name) for name in _EVALUATE_COUNTS if getattr(args, name) is not None}
    problem = _unicode_model_problem(args.model)
    try:
        if args.adapter:
            require_adapter_folder(args.adapter)
        check_evaluation_settings(args.guidance_scale, **counts)
        check_device(args.device)
    except ValueError as error:  # "vqa_images=0 must be ..." -> "--vqa-images 0 must be ...": the flag the user typed
        name, rest = str(error).split("=", 1)
        problem = problem or f"--{name.replace('_', '-')} {rest}"
    if problem:
        print(f"unicode-mllm evaluate: error: {problem}", file=sys.stderr)
        return 2
    model, processor = load_model_and_processor(args.model)
    if args.adapter:  # merged once, so generation runs at the plain model's speed
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter).merge_and_unload()
    model.to(device=args.device, dtype=getattr(torch, args.dtype))
    options = {k: v for k, v in (("guidance_scale", args.guidance_scale), ("seed", args.seed)) if v is not None}
    results = evaluate_on_shapes(model, processor, **counts, **options)
    title = f"`{args.model}`" + (f" + adapter `{args.adapter}`" if args.adapter else "")
    seed = results["settings"]["seed"]
    markdown = f"# UniCode evaluation — {title}\n\nShapes world, seed {seed}.\n\n{metrics_markdown(results)}\n"
    print(markdown)
    if args.output:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        record = {
            "model": args.model,
            "adapter": args.adapter,
            "settings": {**results["settings"], "device": args.device, "dtype": args.dtype},
            **{key: results[key] for key in ("metrics", "chance", "ceiling", "counts")},
        }
        atomic_write_json(out / "evaluation.json", record)
        atomic_write_text(out / "evaluation.md", markdown)
        save_samples(results["examples"], out / SAMPLES_FILE)
        print(f"written: {out / 'evaluation.json'}, {out / 'evaluation.md'}, {out / 'samples.png'}")
    return 0


def _add_evaluate_command(sub) -> None:
    cmd = sub.add_parser(
        "evaluate", help="the demo's metrics (VQA, text-to-image, reconstruction) for any UniCode MLLM"
    )
    cmd.add_argument(
        "--model",
        required=True,
        type=model_reference,
        help="UniCode MLLM folder (a run's mllm/, an export) or Hub repo id",
    )
    cmd.add_argument(
        "--adapter",
        type=model_reference,
        help="PEFT LoRA adapter folder to merge into --model first (finetune's OUTPUT/adapter)",
    )
    for name in _EVALUATE_COUNTS:
        cmd.add_argument("--" + name.replace("_", "-"), type=int, help="default: the tiny demo's")
    cmd.add_argument("--guidance-scale", type=float, help="default 3.0")
    cmd.add_argument("--seed", type=int, help="which Shapes world scenes (default 0, the demo's own test split)")
    cmd.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    cmd.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default="float32",
        help="the weights' precision, as the model would be served (the visual tokenizer included)",
    )
    cmd.add_argument("--output", help="folder for evaluation.json / evaluation.md / samples.png (default: print only)")
    cmd.set_defaults(func=_cmd_evaluate)


def ablation_factor(text: str) -> str:
    """argparse type of `ablate --factors`: checked against the ablation's factors only when the flag is given, so
    building the parser (and `--help`) does not load the ablation and everything it trains."""
    from .ablate import FACTORS

    if text not in FACTORS:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ablation factor; choose from {list(FACTORS)}")
    return text


def _add_demo_commands(sub) -> None:
    for name, helper in (
        ("demo", "the main job: stage 0 -> I -> codes -> decompress -> SFT -> evaluation -> report, offline"),
        ("ablate", "the paper's ablations at small scale, one factor at a time from a shared baseline"),
    ):
        cmd = sub.add_parser(name, help=helper)
        cmd.add_argument("--preset", default="tiny")
        cmd.add_argument(
            "--output",
            default=None if name == "demo" else "outputs/ablate",
            help="run folder (default outputs/demo-PRESET)" if name == "demo" else "folder of the variants' runs",
        )
        cmd.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
        cmd.add_argument("--seed", type=int, default=0)
        for flag, kind in _BUDGET_FLAGS:
            cmd.add_argument(flag, type=kind, help="override the recipe's demo budget")
        if name == "ablate":
            cmd.add_argument(
                "--factors", nargs="+", type=ablation_factor, help="factors of training/ablate.py (default: all)"
            )
        else:  # the ablation sets these itself, one factor at a time
            cmd.add_argument(
                "--paradigm", choices=["frozen", "dual", "iterative"], help="stage I (default: iterative)"
            )
            cmd.add_argument("--quantizer", choices=["vq", "rq", "hq"], help="default: the preset's")
            cmd.add_argument(
                "--llm",
                type=llm_reference,
                help="a pretrained causal LM (folder or .gguf, dequantized once into OUTPUT/text_lm) instead of the "
                "preset's; its width sets the codebook's",
            )
            _add_vision_flags(cmd, ("entropy_weight", "entropy_temperature"))
        cmd.set_defaults(func=_cmd_demo if name == "demo" else _cmd_ablate)


# -- end demo / ablate --------------------------------------------------------------------------


# -- the output folder each command writes (training.run_guard) ---------------------------------------------------
def _add_overwrite_flag(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--overwrite", action="store_true", help=f"train again from scratch: deletes {what} first")


def _output_guard(args: argparse.Namespace, command_line: str):
    """One writer per output folder, and a command's finished or interrupted products kept unless --resume or
    --overwrite says what to do with them (run_guard.guard_output). Commands whose own logic decides what to reuse
    (demo, ablate: settings records; export: --overwrite) take the lock alone."""
    from .run_guard import guard_output

    command = args.command
    options = {"resume": getattr(args, "resume", False), "overwrite": getattr(args, "overwrite", False)}
    if command == "train-text":
        from .presets import load_preset

        # With a pretrained LLM, text_lm/ is its dequantized copy, made once and reused: not a product to guard.
        pretrained = args.llm or load_preset(args.preset)["text_model"].get("source") != "stage0"
        products = [] if pretrained else [TEXT_LM_DIR]
        return guard_output(args.output, command_line, products, resumable=False, **options)
    if command == "train-tokenizer":
        return guard_output(args.output, command_line, [STAGE1_DIR, VISION_TOKENIZER_DIR, LLM_DIR], **options)
    if command == "train":
        products = [f"{STAGE2_DIR}/{args.stage}"] + ([MLLM_DIR] if args.stage == "sft" else [])
        return guard_output(args.output, command_line, products, **options)
    if command == "finetune":
        return guard_output(args.output, command_line, ["trainer", ADAPTER_DIR, "merged"], **options)
    if command == "merge":
        return guard_output(args.output, command_line, whole_folder=True, resumable=False, **options)
    if command == "export":
        return guard_output(args.out_dir, command_line, flag="OUT_DIR")
    if command in ("demo", "ablate") or (command == "evaluate" and args.output):
        return guard_output(args.output or f"outputs/demo-{args.preset}", command_line)
    return contextlib.nullcontext()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unicode-mllm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    presets = sub.add_parser("presets", help="list model presets, or print one")
    presets.add_argument("name", nargs="?")
    presets.set_defaults(func=_cmd_presets)

    text = sub.add_parser(
        "train-text", help="stage 0: BPE tokenizer + small Llama for presets without a pretrained LLM"
    )
    text.add_argument("--preset", default="tiny")
    text.add_argument("--output", default="outputs/tiny")
    text.add_argument("--steps", type=positive_int)
    text.add_argument("--scenes", type=positive_int, help="Shapes scenes whose captions/answers form the domain text")
    text.add_argument(
        "--llm",
        type=llm_reference,
        help="a pretrained causal LM instead (folder or .gguf): a .gguf is dequantized into OUTPUT/text_lm",
    )
    text.add_argument("--seed", type=int, default=0)
    _add_overwrite_flag(text, TEXT_LM_DIR)
    text.set_defaults(func=_cmd_train_text)

    tok = sub.add_parser("train-tokenizer", help="stage I: the visual tokenizer with the unified codebook")
    tok.add_argument("--preset", default="tiny")
    tok.add_argument("--output", default="outputs/tiny")
    tok.add_argument(
        "--llm",
        type=llm_reference,
        help="causal LM folder, repo id or .gguf file (dequantized once into OUTPUT/text_lm); default: the preset's, "
        "or OUTPUT/text_lm. Its width sets code_dim",
    )
    tok.add_argument("--paradigm", choices=["frozen", "dual", "iterative"])
    tok.add_argument("--quantizer", choices=["vq", "rq", "hq"])
    tok.add_argument("--depth", type=positive_int, help="residual levels for --quantizer rq")
    tok.add_argument("--codebook-size", type=positive_int)
    tok.add_argument("--steps", type=positive_int)
    tok.add_argument("--batch-size", type=positive_int)
    tok.add_argument("--lr", type=float)
    tok.add_argument("--gan-weight", type=float)
    tok.add_argument(
        "--dead-code-threshold",
        type=float,
        help="EMA count below which a code is re-seeded from a batch feature (0: never; default: the recipe's)",
    )
    tok.add_argument(
        "--cell-colour-weight",
        type=float,
        help="weight of the term that asks each cell's codes for that cell's mean colour (default: the recipe's)",
    )
    tok.add_argument(
        "--edge-weight",
        type=float,
        help="weight of the reconstruction error counted again where the image has edges (default: the recipe's)",
    )
    tok.add_argument(
        "--cell-colour-resolution",
        type=positive_int,
        help="that term's grid of mean colours per cell side (1: the cell's mean; default: the recipe's)",
    )
    tok.add_argument(
        "--train-images",
        type=positive_int,
        help="how many images to train on (default: the recipe's, or all of --images)",
    )
    tok.add_argument(
        "--images",
        help="train on your images instead of the Shapes world: an imagefolder, a JSON/JSONL/CSV "
        "file of image paths, a save_to_disk folder or a Hub dataset name",
    )
    _add_image_data_flags(tok)
    tok.add_argument(
        "--init-from",
        type=model_reference,
        help="fine-tune: start from this visual tokenizer folder (a run's vision_tokenizer/), "
        "keeping its layout and codebook ids; --llm must be the LLM it was trained with",
    )
    _add_vision_flags(tok, VISION_FLAGS)
    tok.add_argument("--fp32", action="store_true", help="disable bf16 autocast of the convolutions")
    tok.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
    _add_overwrite_flag(tok, f"{STAGE1_DIR}/, {VISION_TOKENIZER_DIR}/ and {LLM_DIR}/")
    tok.add_argument("--seed", type=int, default=0)
    tok.set_defaults(func=_cmd_train_tokenizer)
    _add_stage2_parsers(sub)
    _add_hub_commands(sub)
    _add_demo_commands(sub)
    _add_evaluate_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .checkpointing import DiskFullError
    from .distributed import release_process_group

    parser = build_parser()
    args = parser.parse_args(argv)
    command_line = " ".join([parser.prog, *(sys.argv[1:] if argv is None else argv)])
    try:
        with _output_guard(args, command_line):
            return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, DiskFullError) as error:
        release_process_group(error)
        # From the shell (argv None) a refused input is a message, not a traceback; UNICODE_TRACEBACK=1 shows it.
        # Called from Python (tests, scripts) the exception propagates as it is.
        if argv is not None or os.environ.get("UNICODE_TRACEBACK"):
            raise
        command = " ".join(part for part in (parser.prog, getattr(args, "command", None)) if part)
        parser.exit(2, f"{command}: error: {error}\n")
    except BaseException as error:
        release_process_group(error)  # the traceback holds the command's trainer, and through it the group's threads
        raise
    finally:
        release_process_group()


if __name__ == "__main__":
    sys.exit(main())
