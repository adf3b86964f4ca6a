"""`unicode-mllm`: the command line. Each stage adds its subcommand here.

    unicode-mllm presets [NAME]
    unicode-mllm train-text --preset tiny --output outputs/tiny
    unicode-mllm train-tokenizer --preset tiny --paradigm iterative --quantizer rq --output outputs/tiny
    unicode-mllm export outputs/tiny exports/unicode-tiny [--max-shard-size 5GB] [--adapter | --adapter-only]
    unicode-mllm push exports/unicode-tiny --repo-id NAME/unicode-tiny [--private] [--revision REV] [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _cmd_presets(args: argparse.Namespace) -> int:
    from .presets import list_presets, load_preset

    if args.name:
        print(json.dumps(load_preset(args.name), indent=2))
    else:
        print("\n".join(list_presets()))
    return 0


def _recipe(preset: str) -> dict:
    from .presets import list_presets, load_preset

    return load_preset(preset, "recipes") if preset in list_presets("recipes") else {}


def _pick(flag, recipe: dict, key: str, default):
    return flag if flag is not None else recipe.get(key, default)


def _cmd_train_text(args: argparse.Namespace) -> int:
    from .data.shapes import text_corpus
    from .presets import load_preset
    from .text_lm import train_text_lm

    preset, recipe = load_preset(args.preset), _recipe(args.preset)
    if preset["text_model"].get("source") != "stage0":
        print(f"preset {args.preset!r} uses a pretrained LLM ({preset['text_model'].get('name_or_path')}); nothing to train")
        return 0
    stage0, data = recipe.get("stage0", {}), recipe.get("data", {})
    texts = list(text_corpus(num_scenes=_pick(args.scenes, data, "text_scenes", 4000), seed=args.seed))
    out = train_text_lm(
        Path(args.output) / "text_lm",
        preset["text_model"],
        texts,
        max_steps=_pick(args.steps, stage0, "max_steps", 300),
        batch_size=stage0.get("batch_size", 16),
        block_size=stage0.get("block_size", 128),
        learning_rate=stage0.get("learning_rate", 3e-3),
        seed=args.seed,
    )
    print(f"text LM: {out}")
    return 0


def _cmd_train_tokenizer(args: argparse.Namespace) -> int:
    import torch

    from .data.shapes import build_split, text_corpus
    from .presets import load_preset
    from .stage1 import StageIArguments, StageITrainer, images_to_uint8
    from .text_lm import load_text_lm, packed_blocks

    preset, recipe = load_preset(args.preset), _recipe(args.preset)
    stage1, data = recipe.get("stage1", {}), recipe.get("data", {})
    output = Path(args.output)
    from .checkpointing import is_complete

    if args.resume and is_complete(output / "vision_tokenizer"):
        print(f"stage I already finished: {output / 'vision_tokenizer'} (delete it to train again)")
        return 0
    llm_path = args.llm or preset["text_model"].get("name_or_path") or str(output / "text_lm")
    if preset["text_model"].get("source") == "stage0" and not args.llm and not (output / "text_lm").is_dir():
        raise SystemExit(f"no text LM at {output / 'text_lm'}: run `unicode-mllm train-text --preset {args.preset} "
                         f"--output {args.output}` first, or pass --llm")
    image_size = preset["vision_tokenizer"]["image_size"]
    num_train = _pick(args.train_images, data, "train_images", 8000)
    num_val = data.get("validation_images", 256)
    train = build_split("train", num_train, image_size=image_size, seed=args.seed)
    validation = build_split("validation", num_val, image_size=image_size, seed=args.seed)
    train_images = images_to_uint8(train["image"], image_size, "train")
    eval_images = images_to_uint8(validation["image"], image_size, "validation")
    text_blocks = None
    if (args.paradigm or preset["vision_tokenizer"].get("paradigm")) == "dual":
        _, tokenizer = load_text_lm(llm_path)
        text_blocks = packed_blocks(tokenizer, list(text_corpus(num_scenes=2000, seed=args.seed)), 64)
    stage_args = StageIArguments(
        output_dir=str(output),
        llm_path=str(llm_path),
        preset=args.preset,
        paradigm=args.paradigm,
        quantizer=args.quantizer,
        depth=args.depth,
        codebook_size=args.codebook_size,
        max_steps=_pick(args.steps, stage1, "max_steps", 1000),
        batch_size=_pick(args.batch_size, stage1, "batch_size", 16),
        learning_rate=_pick(args.lr, stage1, "learning_rate", 2e-3),
        warmup_steps=stage1.get("warmup_steps", 50),
        bf16=stage1.get("bf16", True) if not args.fp32 else False,
        seed=args.seed,
        log_every=stage1.get("log_every", 25),
        sample_every=stage1.get("sample_every", 250),
        checkpoint_every=stage1.get("checkpoint_every", 250),
        dual_text_steps=stage1.get("dual_text_steps", 5),
        gan_weight=_pick(args.gan_weight, stage1, "gan_weight", 0.0),
        gan_start_step=stage1.get("gan_start_step", 0),
    )
    torch.set_num_threads(max(1, torch.get_num_threads()))
    metrics = StageITrainer(stage_args, train_images, eval_images, text_blocks=text_blocks).train(resume=args.resume)
    print(json.dumps(metrics, indent=2))
    return 0


# -- hub_upload: export / push (thin wrappers; the work is in hub_upload) ---------------------------
def _cmd_export(args: argparse.Namespace) -> int:
    from hub_upload.export import export_adapter, export_run

    try:
        if args.adapter_only:
            out = export_adapter(args.run_dir, args.out_dir, overwrite=args.overwrite)
        else:
            out = export_run(args.run_dir, args.out_dir, max_shard_size=args.max_shard_size, repo_id=args.repo_id,
                             base_model=args.base_model, base_model_license=args.base_model_license,
                             include_adapter=args.adapter, overwrite=args.overwrite)
    except (ValueError, TypeError) as error:
        print(f"unicode-mllm export: error: {error}", file=sys.stderr)
        return 2
    print(f"exported {args.run_dir} -> {out}")
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    from hub_upload.push import PushError, push_folder

    try:
        result = push_folder(args.folder, args.repo_id, private=args.private, revision=args.revision,
                             dry_run=args.dry_run, commit_message=args.message)
    except (ValueError, TypeError, PushError) as error:
        print(f"unicode-mllm push: error: {error}", file=sys.stderr)
        return 2
    print(result.summary())
    return 0


def _add_hub_commands(sub) -> None:
    export = sub.add_parser("export", help="turn a trained run folder into a Hub repository folder (remote code, model card)")
    export.add_argument("run_dir", help="run folder with mllm/, report.json, samples.png")
    export.add_argument("out_dir", help="new folder to write")
    export.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (default 5GB)")
    export.add_argument("--repo-id", help="repository the model card's snippets load from")
    export.add_argument("--base-model", help="base LLM repo id (default: the report's settings)")
    export.add_argument("--base-model-license", help="its licence, stated on the card (default: known for preset LLMs)")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unicode-mllm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    presets = sub.add_parser("presets", help="list model presets, or print one")
    presets.add_argument("name", nargs="?")
    presets.set_defaults(func=_cmd_presets)

    text = sub.add_parser("train-text", help="stage 0: BPE tokenizer + small Llama for presets without a pretrained LLM")
    text.add_argument("--preset", default="tiny")
    text.add_argument("--output", default="outputs/tiny")
    text.add_argument("--steps", type=int)
    text.add_argument("--scenes", type=int, help="Shapes scenes whose captions/answers form the domain text")
    text.add_argument("--seed", type=int, default=0)
    text.set_defaults(func=_cmd_train_text)

    tok = sub.add_parser("train-tokenizer", help="stage I: the visual tokenizer with the unified codebook")
    tok.add_argument("--preset", default="tiny")
    tok.add_argument("--output", default="outputs/tiny")
    tok.add_argument("--llm", help="causal LM folder, repo id or .gguf file (default: the preset's, or OUTPUT/text_lm)")
    tok.add_argument("--paradigm", choices=["frozen", "dual", "iterative"])
    tok.add_argument("--quantizer", choices=["vq", "rq", "hq"])
    tok.add_argument("--depth", type=int, help="residual levels for --quantizer rq")
    tok.add_argument("--codebook-size", type=int)
    tok.add_argument("--steps", type=int)
    tok.add_argument("--batch-size", type=int)
    tok.add_argument("--lr", type=float)
    tok.add_argument("--gan-weight", type=float)
    tok.add_argument("--train-images", type=int)
    tok.add_argument("--fp32", action="store_true", help="disable bf16 autocast of the convolutions")
    tok.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
    tok.add_argument("--seed", type=int, default=0)
    tok.set_defaults(func=_cmd_train_tokenizer)
    _add_hub_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
