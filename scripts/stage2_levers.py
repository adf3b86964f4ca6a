"""Measure one stage-II recipe on an existing demo run folder (its stage 0 / I / codes / decompression
reused): SFT with the given settings into a scratch copy, then the demo's evaluation.

    OMP_NUM_THREADS=1 python scripts/stage2_levers.py --run outputs/demo-tiny --work /tmp/lever-a \\
        --steps 400 --lr 1e-3 [--full] [--questions-per-image 8 --questions-per-conversation 8] \\
        [--trainer bf16=true group_by_length=true]

Prints one JSON line: the settings, SFT seconds and s/step, VQA overall / per type (with chance),
text-to-image scene match.
"""

import argparse
import json
import shutil
import time
from pathlib import Path

import yaml


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a finished demo run folder (stage 0, I, codes, decompression)")
    parser.add_argument("--work", required=True, help="scratch run folder (replaced)")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--text-embeddings", action="store_true", help="full fine-tuning: train the non-code embedding rows")
    parser.add_argument("--questions-per-image", type=int, default=2)
    parser.add_argument("--questions-per-conversation", type=int, default=1)
    parser.add_argument("--segments", type=int, default=4)
    parser.add_argument("--tasks", nargs="*", default=None, help="SFT tasks (default: all)")
    parser.add_argument("--train-images", type=int, default=1000)
    parser.add_argument("--from-base", action="store_true", help="skip the decompression model (SFT from stage2/base)")
    parser.add_argument("--visual-input", choices=("aggregate", "flatten"), default=None,
                        help="re-assemble the base with this image input (implies --from-base)")
    parser.add_argument("--trainer", nargs="*", default=[], help="SFTConfig fields, key=value (YAML values)")
    parser.add_argument("--seed", type=int, default=0, help="SFT seed (the code dataset and trainer order)")
    parser.add_argument("--vqa-images", type=int, default=100)
    parser.add_argument("--generation-prompts", type=int, default=24)
    args = parser.parse_args()

    from training.data.shapes import build_split
    from training.evaluation import evaluate_generation, evaluate_vqa, majority_answers, train_question_rows
    from training.stage2 import StageIIArguments, assemble_base, load_model_and_processor, train_stage2

    src, work = Path(args.run), Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for name in ("text_lm", "vision_tokenizer", "codes", "llm"):
        if (src / name).exists():
            shutil.copytree(src / name, work / name)
    # Missing pieces (codes, the assembled base) are rebuilt by train_stage2.
    if args.visual_input:
        args.from_base = True
    pieces = ([] if args.visual_input else ["stage2/base"]) + ([] if args.from_base else ["stage2/decompress/model"])
    for name in pieces:
        if (src / name).exists():
            shutil.copytree(src / name, work / name)
    if args.visual_input:
        assemble_base(work, visual_input=args.visual_input)
    extra = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.trainer)}
    stage_args = StageIIArguments(
        run_dir=str(work), stage="sft", max_steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr,
        lora=not args.full, train_text_embeddings=args.text_embeddings, lora_r=args.lora_r, segments=args.segments, questions_per_image=args.questions_per_image,
        questions_per_conversation=args.questions_per_conversation, tasks=args.tasks, train_images=args.train_images, eval_images=32,
        save_steps=10**6, use_cpu=True, seed=args.seed, extra={"save_strategy": "no", **extra},
    )
    started = time.perf_counter()
    metrics = train_stage2(stage_args)
    sft_seconds = time.perf_counter() - started
    model, processor = load_model_and_processor(work / "mllm")
    model.eval()
    started = time.perf_counter()
    test = build_split("test", args.vqa_images, image_size=model.config.vq_config.image_size, seed=0)
    vqa = evaluate_vqa(model, processor, test, majority_answers(train_question_rows(args.train_images, 0)))
    generation = evaluate_generation(model, processor, args.generation_prompts, 3.0)
    eval_seconds = time.perf_counter() - started
    keep = lambda d: {k: round(v, 3) for k, v in d.items() if k.startswith("accuracy")}  # noqa: E731
    print("\n" + json.dumps({
        "settings": {k: v for k, v in vars(args).items() if k not in ("run", "work")},
        "sft_seconds": round(sft_seconds, 1), "train_seconds": round(metrics["train_seconds"], 1),
        "s_per_step": round(metrics["train_seconds"] / args.steps, 3), "eval_seconds": round(eval_seconds, 1),
        "held_out_loss_after": {k: round(v, 3) for k, v in metrics["after"].items()},
        "vqa": keep(vqa["model"]), "vqa_chance": keep(vqa["chance"]),
        "text_to_image": {k: round(v, 3) for k, v in generation["model"].items() if k != "num_images"},
    }))


if __name__ == "__main__":
    main()
