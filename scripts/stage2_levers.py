"""Measure one stage-II recipe on an existing demo run folder (its stage 0 / I / codes / decompression
reused): SFT with the given settings into a scratch copy, then the demo's evaluation.

    OMP_NUM_THREADS=1 python scripts/stage2_levers.py --run outputs/demo-tiny --work /tmp/lever-a \\
        --steps 400 --lr 1e-3 [--full] [--questions-per-image 8 --questions-per-conversation 8] \\
        [--trainer bf16=true group_by_length=true] [--oracle-codes] [--reinit-decoder]

`--oracle-codes` replaces every image's codes, in training and in evaluation, by a colour oracle: at
each code position one fixed codebook id per dominant Shapes colour of the patch (another for
background), the same id at every depth. Eight perfectly consistent codes (seven colours, background)
instead of thousands: if the LM does not ground on those either, better visual codes cannot be what the
demo's VQA is missing.

Prints one JSON line: the settings, SFT seconds and s/step, VQA overall / per type (with chance),
text-to-image scene match.
"""

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modeling_unicode import UniCodeVisualTokenizer, modeling_unicode  # noqa: E402
from training.codes import CODES_COLUMN  # noqa: E402
from training.data.scene_parser import patch_colours  # noqa: E402
from training.data.shapes import build_split, render_scene  # noqa: E402
from training.evaluation import evaluate_generation, evaluate_vqa, majority_answers, train_question_rows  # noqa: E402
from training.stage2 import StageIIArguments, assemble_base, load_model_and_processor, train_stage2  # noqa: E402

ORACLE_COVERAGE = 0.3  # a patch a third covered by a shape already reads as that shape's colour


def colour_oracle_codes(image, token_ids, grid: int, depth: int):
    """(grid, grid, depth) code map of vocabulary ids: per patch, the id of its dominant colour."""
    labels = patch_colours(image, grid, ORACLE_COVERAGE)  # -1 background, else a colour index
    # Spread over the codebook so the oracle ids are not K-neighbours of one another by construction.
    chosen = np.asarray(token_ids)[(labels + 1) * 37 % len(token_ids)]
    return np.repeat(chosen[..., None], depth, axis=-1)


def use_colour_oracle(work: Path) -> None:
    """Rewrite the run's cached code datasets with oracle codes and make the MLLM encode pixels the
    same way, so training and evaluation both see the oracle."""
    config = UniCodeVisualTokenizer.from_pretrained(work / "vision_tokenizer").config
    ids, grid, depth, size = list(config.codebook_token_ids), config.code_grid_size, config.depth, config.image_size
    for folder in sorted(p for p in (work / "codes").iterdir() if (p / "COMPLETE").exists()):
        dataset = datasets.load_from_disk(str(folder))
        signature = dataset.info.description  # the tokenizer's signature: the cache stays valid
        dataset = dataset.map(
            lambda row: {
                CODES_COLUMN: colour_oracle_codes(render_scene(row["scene"], size), ids, grid, depth)
                .reshape(-1)
                .tolist()
            },
            desc=f"oracle codes ({folder.name})",
        )
        dataset.info.description = signature
        kept = {
            name: (folder / name).read_bytes()
            for name in ("COMPLETE", "code_signature.json")
            if (folder / name).exists()
        }
        rewritten = folder.with_name(folder.name + ".oracle")
        dataset.save_to_disk(str(rewritten))
        shutil.rmtree(folder)
        rewritten.rename(folder)
        for name, data in kept.items():
            (folder / name).write_bytes(data)

    def oracle_encode_images(self, pixel_values):
        pixels = ((pixel_values.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        return torch.as_tensor(np.stack([colour_oracle_codes(p, ids, grid, depth) for p in pixels])).long()

    modeling_unicode.UniCodeModel.encode_images = oracle_encode_images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a finished demo run folder (stage 0, I, codes, decompression)")
    parser.add_argument("--work", required=True, help="scratch run folder (replaced)")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument(
        "--text-embeddings", action="store_true", help="full fine-tuning: train the non-code embedding rows"
    )
    parser.add_argument(
        "--reinit-decoder", action="store_true", help="full fine-tuning from the assembled base: fresh decoder layers"
    )
    parser.add_argument("--questions-per-image", type=int, default=2)
    parser.add_argument("--questions-per-conversation", type=int, default=1)
    parser.add_argument("--segments", type=int, default=4)
    parser.add_argument("--tasks", nargs="*", default=None, help="SFT tasks (default: all)")
    parser.add_argument("--train-images", type=int, default=1000)
    parser.add_argument("--from-base", action="store_true", help="skip the decompression model (SFT from stage2/base)")
    parser.add_argument(
        "--visual-input",
        choices=("aggregate", "flatten"),
        default=None,
        help="re-assemble the base with this image input (implies --from-base)",
    )
    parser.add_argument("--trainer", nargs="*", default=[], help="SFTConfig fields, key=value (YAML values)")
    parser.add_argument("--seed", type=int, default=0, help="SFT seed (the code dataset and trainer order)")
    parser.add_argument("--oracle-codes", action="store_true", help="train and evaluate on colour-oracle codes")
    parser.add_argument("--vqa-images", type=int, default=100)
    parser.add_argument("--generation-prompts", type=int, default=24)
    args = parser.parse_args()

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
    if args.oracle_codes:
        use_colour_oracle(work)
    extra = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.trainer)}
    stage_args = StageIIArguments(
        run_dir=str(work),
        stage="sft",
        max_steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        lora=not args.full,
        train_text_embeddings=args.text_embeddings,
        reinit_decoder=args.reinit_decoder,
        lora_r=args.lora_r,
        segments=args.segments,
        questions_per_image=args.questions_per_image,
        questions_per_conversation=args.questions_per_conversation,
        tasks=args.tasks,
        train_images=args.train_images,
        eval_images=32,
        save_steps=10**6,
        use_cpu=True,
        seed=args.seed,
        extra={"save_strategy": "no", **extra},
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
    print(
        "\n"
        + json.dumps(
            {
                "settings": {k: v for k, v in vars(args).items() if k not in ("run", "work")},
                "sft_seconds": round(sft_seconds, 1),
                "train_seconds": round(metrics["train_seconds"], 1),
                "s_per_step": round(metrics["train_seconds"] / args.steps, 3),
                "eval_seconds": round(eval_seconds, 1),
                "held_out_loss_after": {k: round(v, 3) for k, v in metrics["after"].items()},
                "vqa": keep(vqa["model"]),
                "vqa_chance": keep(vqa["chance"]),
                "text_to_image": {k: round(v, 3) for k, v in generation["model"].items() if k != "num_images"},
            }
        )
    )


if __name__ == "__main__":
    main()
