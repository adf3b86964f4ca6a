"""Self-rehearsal: text the LLM writes itself before stage II, mixed into the instruction-tuning rows so that the
LLM keeps its language.

Why: stage II's rows are all about one world of images, and a LoRA trained on them alone drifts the pretrained
LLM's next-token distribution on everything else (docs/results.md, "Gemma 3 270M": held-out English perplexity).
Rows sampled from the LLM's own distribution before training need no corpus, and the loss on them is, up to a
constant, KL(p_before || p_now) over the text the LLM would write: the drift itself ("Mitigating Catastrophic
Forgetting in Large Language Models with Self-Synthesized Rehearsal", Huang et al. 2024, samples instances the same
way). Pure ancestral sampling (temperature 1, no top-k / top-p) keeps the samples unbiased.

With `top_k` > 0 each sampled position also keeps the LLM's `top_k` most likely next tokens and their
probabilities, and the loss there is the cross-entropy against that distribution (over the k ids and one bucket for
the rest, `training.sft.reference_log_prob`): a row read several times then teaches the distribution it was drawn
from, not the drawn text (docs/results.md, "Language kept: the distribution, not the sample"). This is knowledge
distillation from the LLM before SFT (Hinton et al. 2015) on its own samples, with no second model in memory.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import datasets
import torch

from hub_upload.run_folder import CODES_DIR

from .checkpointing import atomic_write_json
from .grounding import GROUNDING_KEYS
from .sft import image_special_token_ids
from .tasks import IGNORE_INDEX

REHEARSAL_TASK = "text"


def rehearsal_share(fraction: float, task_rows: int, rows_trained: int, max_samples: int) -> tuple[int, int]:
    """(distinct samples, rows in the mix) for rehearsal rows to be `fraction` of the SFT rows: as many distinct
    samples as training will read (`fraction` of the `rows_trained`, steps x batch; more are never read), at most
    `max_samples` (each costs a full generation through the LLM's head), repeated up to `fraction` of the mix."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"rehearsal_fraction={fraction} must lie in (0, 1): the share of SFT rows that are rehearsal")
    if max_samples < 1:
        raise ValueError(f"rehearsal_samples={max_samples} must be at least 1")
    mixed = max(1, round(fraction / (1.0 - fraction) * task_rows))
    distinct = max(1, min(mixed, math.ceil(fraction * rows_trained), max_samples))
    return distinct, mixed


def rehearsal_cache(run_dir: str | os.PathLike, rows: int, tokens: int, seed: int, top_k: int = 0) -> Path:
    return Path(run_dir) / CODES_DIR / f"rehearsal-{rows}x{tokens}-k{top_k}-s{seed}.json"


def _sample_next(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token per row of `probs` (B, V), drawn by inverse CDF: one uniform per row against the cumulative
    probabilities. `torch.multinomial` draws V exponentials per row instead, most of a step over a 262k vocabulary
    (docs/results.md, "Language kept: self-rehearsal")."""
    cumulative = probs.cumsum(-1)
    uniform = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device) * cumulative[:, -1:]
    return torch.searchsorted(cumulative, uniform, right=True).clamp(max=probs.shape[-1] - 1).squeeze(-1)


@torch.no_grad()
def sample_rehearsal_text(
    model, tokenizer, rows: int, tokens: int, seed: int = 0, batch_size: int = 32, top_k: int = 0, bf16: bool = False
) -> dict[str, list]:
    """{"rows": `rows` token-id sequences of at most `tokens` new tokens each, sampled by `model` (a UniCode MLLM or
    any causal LM) from its BOS alone; "reference_ids" / "reference_probs": for each sampled token, the `top_k` most
    likely ids there and their probabilities (each row a (tokens, top_k) nested list; empty rows when `top_k` is
    0)}. The image tokens are never sampled: they are not the LLM's language. `bf16`: sample under bf16 autocast,
    as SFT trains when it does (`sft.sft_uses_bf16`), so the rows are the distribution its forward computes."""
    if rows < 1 or tokens < 2:
        raise ValueError(f"rehearsal needs rows >= 1 and tokens >= 2, got rows={rows}, tokens={tokens}")
    if top_k < 0:
        raise ValueError(f"rehearsal_top_k={top_k} must be 0 (sampled tokens only) or a number of reference ids")
    bos = tokenizer.bos_token_id
    if bos is None:
        raise ValueError(
            "the tokenizer has no BOS token to start rehearsal text from; set rehearsal_fraction=0 for this LLM"
        )
    eos = tokenizer.eos_token_id
    suppressed = image_special_token_ids(model) if hasattr(getattr(model, "config", None), "vq_config") else []
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=model.device).manual_seed(seed)
    sampled: dict[str, list] = {"rows": [], "reference_ids": [], "reference_probs": []}
    try:
        for start in range(0, rows, batch_size):
            count = min(batch_size, rows - start)
            step_ids = torch.full((count, 1), bos, dtype=torch.long, device=model.device)
            cache, drawn, top = None, [], []
            finished = torch.zeros(count, dtype=torch.bool, device=model.device)
            for _ in range(tokens):
                with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bf16):
                    out = model(input_ids=step_ids, cache=cache, use_cache=True)
                cache = out.cache
                logits = out.logits[:, -1].float()
                if suppressed:
                    logits[:, suppressed] = -math.inf
                probs = logits.softmax(-1)
                step_ids = _sample_next(probs, generator).unsqueeze(-1)
                drawn.append(step_ids)
                if top_k:
                    top.append(probs.topk(min(top_k, probs.shape[-1]), dim=-1))
                if eos is not None:
                    finished |= step_ids.squeeze(-1).eq(eos)
                    if bool(finished.all()):
                        break
            # One transfer to lists per batch, not one per row and step.
            top_ids = torch.stack([t.indices for t in top], 1).tolist() if top_k else None
            top_probs = torch.stack([t.values for t in top], 1).tolist() if top_k else None
            for i, row in enumerate(torch.cat(drawn, 1).tolist()):
                if eos is not None and eos in row:
                    row = row[: row.index(eos) + 1]  # the LLM ending its text is part of its language too
                sampled["rows"].append(row)
                sampled["reference_ids"].append(top_ids[i][: len(row)] if top_k else [])
                sampled["reference_probs"].append(
                    [[round(p, 6) for p in step] for step in top_probs[i][: len(row)]] if top_k else []
                )
    finally:
        model.train(was_training)
    return sampled


def _model_source(model) -> str:
    """The folder a model was loaded from, links resolved (runs that link one base share its samples); "" when it
    was built in memory."""
    name = getattr(model, "name_or_path", "") or ""
    return str(Path(name).resolve()) if name and Path(name).exists() else name


def reference_features(features: datasets.Features) -> datasets.Features:
    """`features` plus the two reference columns (`sample_rehearsal_text`): per labelled token, the ids and
    probabilities the LLM gave there before SFT; empty in rows that are not rehearsal."""
    return datasets.Features(
        {
            **features,
            "reference_ids": datasets.Sequence(datasets.Sequence(datasets.Value("int32"))),
            "reference_probs": datasets.Sequence(datasets.Sequence(datasets.Value("float32"))),
        }
    )


def with_reference_columns(rows: datasets.Dataset) -> datasets.Dataset:
    """`rows` with empty reference columns, to be concatenated with rehearsal rows that carry them."""
    return rows.map(lambda _: {"reference_ids": [], "reference_probs": []}, features=reference_features(rows.features))


def rehearsal_dataset(
    run_dir,
    model,
    tokenizer,
    share: tuple[int, int],
    tokens: int,
    seed: int,
    features,
    top_k: int = 0,
    bf16: bool = False,
) -> datasets.Dataset:
    """Tokenized rehearsal rows (`input_ids` = BOS + sampled text, every sampled token labelled; no image) with
    the SFT rows' `features`: `share` = (distinct samples, rows), from `rehearsal_share`. With `top_k` > 0 the rows
    also carry the reference columns (`reference_features`; give the SFT rows them with `with_reference_columns`).
    Sampled on first use and read from the run's cache after that while `model` is the one they were sampled from,
    in the same precision (`model=None`: the cache, whichever model wrote it). `bf16`: as `sample_rehearsal_text`."""
    distinct, mixed = share
    cache = rehearsal_cache(run_dir, distinct, tokens, seed, top_k)
    cached = json.loads(cache.read_text()) if cache.is_file() else None
    source = None if model is None else _model_source(model)
    # A cache written before the precision was recorded holds no "bf16": it stands, as it did.
    stale = cached is not None and model is not None and cached.get("bf16", bf16) != bf16
    if cached is None or source not in (None, cached.get("model")) or stale:
        cached = sample_rehearsal_text(model, tokenizer, distinct, tokens, seed, top_k=top_k, bf16=bf16)
        cache.parent.mkdir(parents=True, exist_ok=True)
        record = {"tokens": tokens, "seed": seed, "top_k": top_k, "model": source, "bf16": bf16}
        atomic_write_json(cache, {**cached, **record})
    order = [i % len(cached["rows"]) for i in range(mixed)]
    texts = [cached["rows"][i] for i in order]
    bos = tokenizer.bos_token_id
    columns = {
        "input_ids": [[bos] + text for text in texts],
        "labels": [[IGNORE_INDEX] + text for text in texts],
        "image_codes": [[] for _ in texts],
    }
    if "task" in features:
        columns["task"] = [REHEARSAL_TASK] * len(texts)
    for name in GROUNDING_KEYS:  # SFT rows with grounded answers (training.grounding): none here
        if name in features:
            columns[name] = [[] for _ in texts]
    if top_k:
        features = reference_features(features)
        columns["reference_ids"] = [cached["reference_ids"][i] for i in order]
        columns["reference_probs"] = [cached["reference_probs"][i] for i in order]
    return datasets.Dataset.from_dict(columns).cast(features)


__all__ = [
    "REHEARSAL_TASK",
    "rehearsal_share",
    "rehearsal_cache",
    "sample_rehearsal_text",
    "reference_features",
    "with_reference_columns",
    "rehearsal_dataset",
]
