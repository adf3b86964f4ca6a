"""Why a run's MLLM draws what it draws: text-to-image teacher-forced and free-running.

    python scripts/generation_probe.py --run outputs/demo-v9 [--guidance-scale 3] [--prompts 24]

Teacher-forced: each validation scene of `<run>/codes/validation-*` (from `demo` / stage II) goes in as
its first caption, `<boi>` and its true codes. Per code slot of a position (slot 0 is level 0, or HQ's
top code), the negative log-likelihood of the true id where it is the background id (the id most
frequent in the slot) and where it is any other id, and the background probability at both. Free-running:
the demo's single-shape prompts, decoded greedily, by sampling, and by top-k sampling; per decoding, how
many distinct ids the images hold, the share of background ids, and the scene parser's match.

If the "other" NLL is near the log of the number of distinct non-background ids of the training codes
(`uniform_other_nll`), the model knows where a shape goes but not which codes draw it, and no decoding
rule can help (docs/results.md, "Why text-to-image stays at 0 %").

Prints one JSON line.
"""

import argparse
import collections
import json
import math
import sys
from pathlib import Path

import datasets
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.codes import CODES_COLUMN  # noqa: E402
from training.evaluation import generate_images, single_shape_prompts  # noqa: E402
from training.metrics import load_metric  # noqa: E402
from training.stage2 import load_model_and_processor  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a finished demo run folder (mllm/ and codes/)")
    parser.add_argument("--guidance-scale", type=float, default=3.0, help="for both parts; 1 disables guidance")
    parser.add_argument("--prompts", type=int, default=24, help="single-shape prompts for the free-running part")
    parser.add_argument("--top-k", type=int, default=20)
    args = parser.parse_args()

    run = Path(args.run)
    folders = sorted(p for p in (run / "codes").glob("validation-*") if (p / "COMPLETE").exists())
    if not (run / "mllm").is_dir() or not folders:
        raise SystemExit(f"--run {run} needs mllm/ and a complete codes/validation-*; run `unicode-mllm demo` first")
    model, processor = load_model_and_processor(run / "mllm")
    model.eval()
    config = model.config
    grid = config.vq_config.code_grid_size
    validation = datasets.load_from_disk(str(folders[0]))
    codes = torch.tensor(validation[CODES_COLUMN])  # (scenes, ĥ·ŵ·D) vocabulary ids
    slots = codes.shape[1] // (grid * grid)
    slot_of = torch.arange(codes.shape[1]) % slots
    background = [
        collections.Counter(codes[:, slot_of == s].flatten().tolist()).most_common(1)[0][0] for s in range(slots)
    ]
    guided = args.guidance_scale != 1.0

    def code_logits(prompt_ids: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
        ids = torch.cat([prompt_ids, torch.tensor([[config.boi_token_id]]), row[None]], dim=1)
        with torch.no_grad():
            return model(input_ids=ids).logits[0, -row.numel() - 1 : -1].float()

    sums = collections.defaultdict(float)
    counts = collections.Counter()
    for row, captions in zip(codes, validation["captions"]):
        inputs = processor(text=[captions[0]], generation_mode="image")
        logits = code_logits(inputs["input_ids"], row)
        if guided:
            unconditional = code_logits(inputs["unconditional_input_ids"], row)
            logits = unconditional + args.guidance_scale * (logits - unconditional)
        log_probs = logits.log_softmax(-1)
        nll = -log_probs.gather(1, row[:, None]).squeeze(1)
        for s in range(slots):
            in_slot = slot_of == s
            is_background = row == background[s]
            p_background = log_probs[:, background[s]].exp()
            for kind, where in (("background", in_slot & is_background), ("other", in_slot & ~is_background)):
                sums[f"slot{s}_{kind}_nll"] += float(nll[where].sum())
                sums[f"slot{s}_p_background_at_{kind}"] += float(p_background[where].sum())
                counts[f"slot{s}_{kind}"] += int(where.sum())
    # The ids a uniform guess would spread over: those of the training codes (the validation scenes alone
    # hold far fewer), so "other_nll" near "uniform_other_nll" means the model has not learnt which id.
    train_folders = sorted(p for p in (run / "codes").glob("train-*") if (p / "COMPLETE").exists())
    reference = torch.tensor(datasets.load_from_disk(str(train_folders[0]))[CODES_COLUMN]) if train_folders else codes
    reference_slot = torch.arange(reference.shape[1]) % slots
    teacher_forced = {}
    for s in range(slots):
        others = reference[:, reference_slot == s]
        distinct = len(set(others[others != background[s]].tolist()))
        teacher_forced[f"slot{s}"] = {
            "background_id": background[s],
            "background_share": round(
                counts[f"slot{s}_background"] / max(1, counts[f"slot{s}_background"] + counts[f"slot{s}_other"]), 3
            ),
            **{
                key: round(sums[f"slot{s}_{key}"] / max(1, counts[f"slot{s}_{kind}"]), 3)
                for kind in ("background", "other")
                for key in (f"{kind}_nll", f"p_background_at_{kind}")
            },
            "distinct_other_ids_in_training": distinct,
            "uniform_other_nll": round(math.log(max(1, distinct)), 3),
        }

    prompts = single_shape_prompts(args.prompts, config.vq_config.image_size, seed=0)
    captions, scenes = [c for c, _ in prompts], [s for _, s in prompts]
    metric = load_metric("scene_match")
    free_running = {}
    for name, sampling in (
        ("greedy", {}),
        ("sampled", {"do_sample": True, "temperature": 1.0, "top_k": 0}),
        (f"top{args.top_k}", {"do_sample": True, "temperature": 1.0, "top_k": args.top_k}),
    ):
        images, generated = generate_images(
            model, processor, captions, args.guidance_scale, seed=0, return_codes=True, desc=name, **sampling
        )
        share = (
            float(sum((generated[:, slot_of == s] == background[s]).sum() for s in range(slots))) / generated.numel()
        )
        scores = metric.compute(predictions=images, references=scenes)
        free_running[name] = {
            "distinct_ids": len(set(generated.flatten().tolist())),
            "background_share": round(share, 3),
            **{k: round(v, 3) for k, v in scores.items() if k != "num_images"},
        }

    print(
        json.dumps(
            {
                "run": str(run),
                "guidance_scale": args.guidance_scale,
                "validation_scenes": len(codes),
                "training_scenes": len(reference) if train_folders else 0,
                "teacher_forced": teacher_forced,
                "free_running": free_running,
            }
        )
    )


if __name__ == "__main__":
    main()
