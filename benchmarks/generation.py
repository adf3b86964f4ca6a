"""Image-generation speed of the UniCode MLLM, on random-init models of the `tiny` and `small` sizes.

Measures, per preset, one text-to-image generation of a batch of captions (ĥ·ŵ·D code ids each):
- classifier-free guidance batched into one forward per step (ours) vs a two-pass loop with one KV
  cache per branch (the Emu3 approach): goal ≥ 1.8x;
- with vs without the KV cache;
- the `<boi>` span constraint vs unconstrained sampling of the same length: goal ≤ 10 % overhead;
- placeholders (prefill tokens) for one input image in aggregate vs flatten mode, and prefill time.

    python benchmarks/generation.py                 # tiny and small, one run, prints a table
    python benchmarks/generation.py --presets tiny --repeats 5

Weights are random: speed does not depend on them. Median of `--repeats` runs after one warm-up.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from transformers import DynamicCache, LlamaConfig, LogitsProcessorList  # noqa: E402
from transformers.generation import TopKLogitsWarper  # noqa: E402

from modeling_unicode import (  # noqa: E402
    UniCodeConfig,
    UniCodeForConditionalGeneration,
    UniCodeVisualTokenizerConfig,
)
from training.presets import list_presets, load_preset  # noqa: E402

TEXT_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
)
CAPTION_LENGTHS = (24, 17)  # tokens of the two conditional prompts; the unconditional one has 12
GUIDANCE = 3.0


def preset_sizes(name: str) -> dict:
    if name in list_presets():
        return load_preset(name)
    raise ValueError(f"preset={name!r} is unknown; choose from {list_presets()}")


def build_model(name: str, visual_input: str = "aggregate") -> UniCodeForConditionalGeneration:
    sizes = preset_sizes(name)
    text = LlamaConfig(
        **{k: sizes["text_model"][k] for k in TEXT_KEYS}, pad_token_id=0, bos_token_id=1, eos_token_id=2
    )
    vq_fields = {k: v for k, v in sizes["vision_tokenizer"].items() if k in UniCodeVisualTokenizerConfig().to_dict()}
    first_code = 16  # codes: ordinary rows after a few reserved ids; the image special tokens sit at the end
    vq_fields.update(
        store_codebook=False, codebook_token_ids=list(range(first_code, first_code + vq_fields["codebook_size"]))
    )
    vocab = text.vocab_size
    config = UniCodeConfig(
        text_config=text,
        vq_config=UniCodeVisualTokenizerConfig(**vq_fields),
        visual_input=visual_input,
        image_token_id=vocab - 3,
        boi_token_id=vocab - 2,
        eoi_token_id=vocab - 1,
    )
    torch.manual_seed(0)
    return UniCodeForConditionalGeneration(config).eval()


def prompts(model, batch: int):
    """Left-padded conditional prompts and the (shorter) unconditional prompt, as the processor makes them."""
    g = torch.Generator().manual_seed(1)
    lengths = [CAPTION_LENGTHS[i % len(CAPTION_LENGTHS)] for i in range(batch)]
    width = max(lengths)
    ids = torch.zeros(batch, width, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, width - length :] = torch.randint(3, 16, (length,), generator=g)
        mask[row, width - length :] = 1
    uncond = torch.randint(3, 16, (1, 12), generator=g).expand(batch, -1)
    return ids, mask, uncond, torch.ones_like(uncond)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def compare(variants: dict, repeats: int) -> dict:
    """Median seconds per variant, the variants interleaved run by run, so a load spike from other
    processes on a shared machine hits all of them rather than skewing one ratio."""
    for fn in variants.values():
        fn()  # warm-up
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


@torch.no_grad()
def two_pass_cfg(model, ids, mask, uncond, uncond_mask, scale: float, top_k: int):
    """The Emu3-style loop: conditional and unconditional branches in separate forwards and caches,
    with the same span constraint and sampling as ours."""
    n = model.config.image_tokens_per_generation
    boi = torch.full((ids.shape[0], 1), model.config.boi_token_id)
    processors = LogitsProcessorList([model.image_span_logits_processor(), TopKLogitsWarper(top_k)])
    branches = []
    for branch_ids, branch_mask in ((ids, mask), (uncond, uncond_mask)):
        branch_ids = torch.cat([branch_ids, boi], 1)
        branch_mask = torch.cat([branch_mask, torch.ones_like(boi)], 1)
        positions = (branch_mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=model.config.get_text_config())
        logits = model._next_token_logits(branch_ids, branch_mask, positions, cache, True)
        branches.append([branch_mask, positions, cache, logits])
    sequences = torch.cat([ids, boi], 1)
    for step in range(n):
        (_, _, _, cond), (_, _, _, unc) = branches
        scores = processors(sequences, unc + scale * (cond - unc))
        tokens = torch.multinomial(torch.softmax(scores, -1), 1)
        sequences = torch.cat([sequences, tokens], 1)
        if step == n - 1:
            break
        for branch in branches:
            branch[0] = torch.cat([branch[0], torch.ones_like(tokens)], 1)
            branch[1] = torch.cat([branch[1], branch[1][:, -1:] + 1], 1)
            branch[3] = model._next_token_logits(tokens, branch[0], branch[1][:, -1:], branch[2], True)
    return sequences


@torch.no_grad()
def decode_steps(model, rows: int, steps: int = 32, context: int = 64) -> None:
    """`steps` cached one-token forwards of `rows` rows: the unit cost that CFG batching halves."""
    ids = torch.randint(3, 16, (rows, context))
    mask = torch.ones_like(ids)
    positions = torch.arange(context).expand(rows, -1)
    cache = DynamicCache(config=model.config.get_text_config())
    model._next_token_logits(ids, mask, positions, cache, True)
    for step in range(steps):
        mask = torch.cat([mask, mask[:, :1]], 1)
        model._next_token_logits(ids[:, :1], mask, positions[:, -1:] + step + 1, cache, True)


def bench_preset(name: str, batch: int, repeats: int) -> dict:
    model = build_model(name)
    ids, mask, uncond, uncond_mask = prompts(model, batch)
    common = dict(generation_mode="image", do_sample=True, top_k=100)
    cfg = dict(
        common, unconditional_input_ids=uncond, unconditional_attention_mask=uncond_mask, guidance_scale=GUIDANCE
    )

    def run(**kwargs):
        torch.manual_seed(0)
        return model.generate(input_ids=ids, attention_mask=mask, **kwargs)

    row = {"preset": name, "ids_per_image": model.config.image_tokens_per_generation, "batch": batch}
    row.update(
        compare(
            {
                "batched_cfg_s": lambda: run(**cfg),
                "two_pass_cfg_s": lambda: (
                    torch.manual_seed(0),
                    two_pass_cfg(model, ids, mask, uncond, uncond_mask, GUIDANCE, 100),
                ),
                "unconstrained_s": lambda: run(**cfg, image_span_constraint=False),
            },
            repeats,
        )
    )
    # What batching can buy at best here: two 1-row decode steps vs one 2-row step. On a GPU a decode
    # step barely notices a second row; on a CPU thread the GEMMs cost nearly twice as much.
    steps = compare(
        {"one_row": lambda: decode_steps(model, batch), "two_rows": lambda: decode_steps(model, 2 * batch)}, repeats
    )
    row["ceiling"] = 2 * steps["one_row"] / steps["two_rows"]
    start = time.perf_counter()  # quadratic without a cache: one run, the model is warm by now
    run(**cfg, use_cache=False)
    row["no_cache_s"] = time.perf_counter() - start

    for visual_input in ("aggregate", "flatten"):
        reader = build_model(name, visual_input)
        n = reader.config.image_seq_length
        text = torch.randint(3, 16, (1, 20))
        image_ids = torch.cat([text[:, :10], torch.full((1, n), reader.config.image_token_id), text[:, 10:]], 1)
        codes = torch.tensor(reader.config.vq_config.codebook_token_ids[: reader.config.vq_config.tokens_per_image])[
            None
        ]
        row[f"{visual_input}_tokens"] = n
        with torch.no_grad():
            row[f"{visual_input}_prefill_s"] = timed(
                lambda: reader(input_ids=image_ids, image_codes=codes, logits_to_keep=1), repeats
            )
    return row


def format_table(rows: list[dict]) -> str:
    lines = [
        "| preset | ids/image | batch | batched CFG (s) | two-pass CFG (s) | speed-up | no KV cache (s) | cache "
        "speed-up "
        "| unconstrained (s) | constraint overhead | prefill tokens/image agg / flat | prefill agg / flat (ms) | "
        "batching ceiling |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['preset']} | {r['ids_per_image']} | {r['batch']} | {r['batched_cfg_s']:.3f} | "
            f"{r['two_pass_cfg_s']:.3f} "
            f"| {r['two_pass_cfg_s'] / r['batched_cfg_s']:.2f}x | {r['no_cache_s']:.3f} | "
            f"{r['no_cache_s'] / r['batched_cfg_s']:.2f}x "
            f"| {r['unconstrained_s']:.3f} | {100 * (r['batched_cfg_s'] / r['unconstrained_s'] - 1):+.1f} % "
            f"| {r['aggregate_tokens']} / {r['flatten_tokens']} "
            f"| {1000 * r['aggregate_prefill_s']:.1f} / {1000 * r['flatten_prefill_s']:.1f} | {r['ceiling']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--batch", type=int, default=1, help="captions per generate call (CFG doubles the rows)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier on a shared machine)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"# UniCode image generation, cpu ({os.cpu_count()} cores, load {load:.1f} at start), torch "
        f"{torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), guidance {GUIDANCE}, top-k 100, median of {args.repeats} interleaved "
        "runs"
    )
    rows = [bench_preset(name, args.batch, args.repeats) for name in args.presets]
    print(format_table(rows))
    print(
        "speed-up: two-pass / batched CFG (goal >= 1.8x); batching ceiling: 2 x t(1-row decode step) / t(2-row step) "
        "on this machine, the most any CFG batching can gain here; constraint overhead: batched CFG with vs "
        "without the <boi> span constraint (goal <= 10 %)."
    )


if __name__ == "__main__":
    main()
