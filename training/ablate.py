"""`unicode-mllm ablate`: the paper's ablations at small scale on the Shapes world.

One factor at a time from a shared baseline (the preset's paradigm and quantizer, decompression
pre-training on, unified codebook, aggregated image input), every variant with the same budget (the
recipe's `demo` section with its `ablate` overrides). A variant reuses the baseline's stage 0 (all do)
and stage I (all but the paradigm and quantizer variants) by copying the finished folders, and its
wall time counts the reused stages at the baseline's measured seconds, so the column is what the
variant would cost from scratch.

    <out>/<variant>/          a demo run folder per variant (report.json, samples.png, mllm/, ...)
    <out>/ablation.json|.md   the table: VQA accuracy, text-to-image scene match, PSNR, wall time

The "separate codebook" variant exists only for this comparison and lives here, not in
`modeling_unicode`: the baseline's trained code vectors become K NEW vocabulary rows (tokens
`<vis_0>` ... `<vis_K-1>`, initialised as copies of the code vectors) and the visual tokenizer's
`codebook_token_ids` point at them, so images and text no longer share rows of the embedding table
or of the LM head. Everything else (encoder, decoder, code assignment, budgets) is the baseline's.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

from hub_upload.run_folder import LLM_DIR, TEXT_LM_DIR, VISION_TOKENIZER_DIR
from modeling_unicode import UniCodeVisualTokenizer

from .checkpointing import atomic_directory, atomic_write_json, atomic_write_text, is_complete
from .demo import STAGE_FOLDERS, DemoArguments, _recipe, copy_stage_record, demo_budget, run_demo
from .text_lm import load_text_lm

# factor -> variants other than the baseline's value (the baseline is named "baseline")
FACTORS = {
    "paradigm": ("frozen", "dual"),
    "quantizer": ("vq", "hq"),
    "decompression": ("off",),
    "codebook": ("separate",),
    "visual_input": ("flatten",),
}
REUSES_STAGE1 = {"decompression", "codebook", "visual_input"}
TRAINING_STAGES = ("stage0_text_lm", "stage1_tokenizer", "code_datasets", "stage2_decompress", "stage2_sft")


def make_separate_codebook(run: str | Path) -> Path:
    """Turn `<run>` (text_lm/ + a unified vision_tokenizer/) into the separate-vocabulary variant:
    `<run>/llm/` (the LLM + tokenizer with K new rows = the code vectors) and `<run>/vision_tokenizer/`
    whose codes are those new ids. Stage II's LLM lookup prefers `<run>/llm/`."""
    run = Path(run)
    if is_complete(run / LLM_DIR):
        return run / LLM_DIR
    vision = UniCodeVisualTokenizer.from_pretrained(run / VISION_TOKENIZER_DIR)
    if vision.codebook is None:
        raise ValueError(f"{run / 'vision_tokenizer'} stores no codebook; pass a standalone stage-I tokenizer folder")
    llm, tokenizer = load_text_lm(str(run / TEXT_LM_DIR))
    k = vision.config.codebook_size
    first = len(tokenizer)
    added = tokenizer.add_tokens([f"<vis_{i}>" for i in range(k)])
    if added != k:
        raise ValueError(
            f"the tokenizer already has some <vis_i> tokens ({added} of {k} added); start from a fresh text_lm"
        )
    llm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    new_ids = list(range(first, first + k))
    with torch.no_grad():
        llm.get_input_embeddings().weight[first : first + k] = vision.codebook.detach().to(llm.dtype)
        head = llm.get_output_embeddings()
        if head is not None and head.weight.data_ptr() != llm.get_input_embeddings().weight.data_ptr():
            head.weight[first : first + k] = vision.codebook.detach().to(llm.dtype)
    vision.config.codebook_token_ids = new_ids
    with atomic_directory(run / LLM_DIR) as staging:
        llm.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    with atomic_directory(run / VISION_TOKENIZER_DIR) as staging:
        vision.save_pretrained(staging)
    return run / LLM_DIR


def _variant_arguments(
    base: DemoArguments, factor: Optional[str], value: Optional[str], folder: Path
) -> DemoArguments:
    args = replace(base, output_dir=str(folder))
    if factor == "paradigm":
        args.paradigm = value
    elif factor == "quantizer":
        args.quantizer = value
    elif factor == "decompression":
        args.decompress = False
    elif factor == "visual_input":
        args.visual_input = value
    return args


def _seed_from_baseline(baseline: Path, folder: Path, factor: str) -> None:
    """Copy the finished stages a variant shares with the baseline (never over a finished copy), with
    the record of their settings: without it the variant's demo refuses to reuse them."""
    for stage in ["stage0_text_lm"] + (["stage1_tokenizer"] if factor in REUSES_STAGE1 else []):
        fresh = not (folder / STAGE_FOLDERS[stage][0]).exists()
        for name in STAGE_FOLDERS[stage]:
            if (baseline / name).is_dir() and not (folder / name).exists():
                shutil.copytree(baseline / name, folder / name)
        if fresh:
            copy_stage_record(baseline, folder, stage)
    if factor == "codebook":
        make_separate_codebook(folder)


def _row(name: str, factor: str, report: dict, baseline_report: dict) -> dict:
    metrics = report["metrics"]
    wall = report["wall_seconds"]
    held_out = report.get("stage_metrics", {}).get("stage2_sft", {}).get("after") or {}
    # A reused stage counts at the baseline's seconds: the variant's cost from scratch.
    seconds = sum(
        (
            baseline_report["wall_seconds"].get(s, 0.0)
            if report["reused"].get(s) and name != "baseline"
            else wall.get(s, 0.0)
        )
        for s in TRAINING_STAGES
    ) + wall.get("evaluation", 0.0)
    return {
        "variant": name,
        "factor": factor,
        "vqa_accuracy": metrics["vqa"]["accuracy"],
        "vqa_compositional": metrics["vqa_compositional"]["accuracy"],
        "t2i_all_correct": metrics["text_to_image"]["all_correct"],
        "t2i_color": metrics["text_to_image"]["color"],
        "t2i_shape": metrics["text_to_image"]["shape"],
        "psnr": metrics["reconstruction"]["psnr"],
        "codebook_usage": metrics["reconstruction"]["codebook_usage"],
        "wall_seconds": seconds,
        "stage2_sft_loss_after": held_out,
        # Nats per code on held-out scenes: a generation signal where every all-correct score is 0.
        "t2i_loss": held_out.get("text_to_image"),
    }


def claims(rows: dict[str, dict]) -> dict[str, Optional[bool]]:
    """The paper's claims, checked on the measured rows (None where a variant was not run)."""

    def get(name, key):
        return rows[name].get(key) if name in rows else None  # None: not run, or not measured

    def holds(*pairs, strict=False):
        # "A > B" and "A helps" need a strict gain: a tie (e.g. 0 % vs 0 % text-to-image) shows nothing.
        # A loss key compares the other way round (lower is better).
        values = [(get(a, k), get(b, k), k.endswith("_loss")) for a, b, k in pairs]
        if any(x is None or y is None for x, y, _ in values):
            return None
        return all(
            ((y > x) if strict else (y >= x)) if loss else ((x > y) if strict else (x >= y)) for x, y, loss in values
        )

    iterative = "baseline"
    return {
        "iterative > frozen > dual (VQA)": holds(
            (iterative, "paradigm=frozen", "vqa_accuracy"),
            ("paradigm=frozen", "paradigm=dual", "vqa_accuracy"),
            strict=True,
        ),
        "HQ >= RQ >= VQ (VQA)": holds(
            ("quantizer=hq", "baseline", "vqa_accuracy"), ("baseline", "quantizer=vq", "vqa_accuracy")
        ),
        "decompression pre-training helps generation": holds(
            ("baseline", "decompression=off", "t2i_all_correct"), strict=True
        ),
        # Both pairs below share the baseline's code assignment, so their held-out code losses compare.
        "decompression pre-training helps generation (held-out text-to-image loss)": holds(
            ("baseline", "decompression=off", "t2i_loss"), strict=True
        ),
        "unified >= separate (VQA and generation)": holds(
            ("baseline", "codebook=separate", "vqa_accuracy"), ("baseline", "codebook=separate", "t2i_all_correct")
        ),
        "unified >= separate (held-out text-to-image loss)": holds(("baseline", "codebook=separate", "t2i_loss")),
        "aggregate >= flatten (VQA)": holds(("baseline", "visual_input=flatten", "vqa_accuracy")),
    }


def ablation_markdown(rows: dict[str, dict], checks: dict, seconds: float) -> str:
    lines = [
        "# UniCode ablations (Shapes world, equal budgets)",
        "",
        "| variant | VQA | VQA compositional | t2i all-correct | t2i colour | t2i shape | t2i held-out loss "
        "(nats/code) "
        "| PSNR (dB) | usage | wall (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        loss = "n/a" if r.get("t2i_loss") is None else f"{r['t2i_loss']:.3f}"
        lines.append(
            f"| {name} | {r['vqa_accuracy']:.3f} | {r['vqa_compositional']:.3f} | {r['t2i_all_correct']:.3f} | "
            f"{r['t2i_color']:.3f} | {r['t2i_shape']:.3f} | {loss} | {r['psnr']:.2f} | {r['codebook_usage']:.3f} | "
            f"{r['wall_seconds']:.0f} |"
        )
    lines += [
        "",
        "The held-out loss compares only between variants that share the baseline's codes (decompression, "
        "codebook, visual input): another tokenizer's codes are another prediction problem.",
    ]
    lines += ["", "| paper's claim | holds here |", "|---|---|"]
    for claim, holds in checks.items():
        lines.append(f"| {claim} | {'not run' if holds is None else ('yes' if holds else 'no')} |")
    lines += ["", f"Whole ablation: {seconds:.0f} s wall.", ""]
    return "\n".join(lines)


def run_ablation(
    output_dir: str | Path,
    preset: str = "tiny",
    factors=None,
    seed: int = 0,
    device: str = "cpu",
    budget: Optional[dict] = None,
    demo_overrides: Optional[dict] = None,
) -> dict:
    """Run the baseline and each variant of `factors`; write `ablation.json` / `ablation.md`.
    `demo_overrides`: extra `DemoArguments` fields for every variant (tests: a reduced model)."""
    factors = list(FACTORS) if factors is None else list(factors)
    unknown = [f for f in factors if f not in FACTORS]
    if unknown:
        raise ValueError(f"factors {unknown} are not ablation factors; use some of {list(FACTORS)}")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    merged_budget = {**(_recipe(preset).get("ablate") or {}), **(budget or {})}
    demo_budget(preset, merged_budget)  # fail early on a bad key, before any training
    # The baseline is the paper's design, whatever the preset reads its images with: each factor varies one choice
    # of the paper's, so `visual_input=flatten` is compared with the paper's aggregate input.
    overrides = {"visual_input": "aggregate", **(demo_overrides or {})}
    base = DemoArguments(output_dir="", preset=preset, seed=seed, device=device, budget=merged_budget, **overrides)
    started = time.perf_counter()
    print("== ablation variant: baseline", flush=True)
    baseline_report = run_demo(_variant_arguments(base, None, None, out / "baseline"))
    rows = {"baseline": _row("baseline", "-", baseline_report, baseline_report)}
    for factor in factors:
        for value in FACTORS[factor]:
            name = f"{factor}={value}"
            folder = out / name
            print(f"== ablation variant: {name}", flush=True)
            folder.mkdir(parents=True, exist_ok=True)
            _seed_from_baseline(out / "baseline", folder, factor)
            report = run_demo(_variant_arguments(base, factor, value, folder))
            rows[name] = _row(name, factor, report, baseline_report)
    seconds = time.perf_counter() - started
    checks = claims(rows)
    table = {
        "preset": preset,
        "seed": seed,
        "device": device,
        "budget": demo_budget(preset, merged_budget),
        "rows": rows,
        "claims": checks,
        "wall_seconds": seconds,
    }
    markdown = ablation_markdown(rows, checks, seconds)
    atomic_write_json(out / "ablation.json", table)
    atomic_write_text(out / "ablation.md", markdown)
    return {**table, "markdown": markdown}


__all__ = ["FACTORS", "make_separate_codebook", "claims", "ablation_markdown", "run_ablation"]
