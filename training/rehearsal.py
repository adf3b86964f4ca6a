"""Self-rehearsal: text the LLM writes itself before stage II, mixed into the instruction-tuning rows so that the
LLM keeps its language.

Why: stage II's rows are all about one world of images, and a LoRA trained on them alone drifts the pretrained
LLM's next-token distribution on everything else (docs/results.md, "Gemma 3 270M": held-out English perplexity).
Rows sampled from the LLM's own distribution before training need no corpus, and the loss on them is, up to a
constant, KL(p_before || p_now) over the text the LLM would write: the drift itself ("Mitigating Catastrophic
Forgetting in Large Language Models with Self-Synthesized Rehearsal", Huang et al. 2024, samples instances the same
way). Pure ancestral sampling (temperature 1, no top-k / top-p) keeps the samples unbiased.

The rows are sampled once per (run, count, length, seed) and cached in the run's codes folder, with the model they
were sampled from: a stage II that starts from another model (the decompression stage's) samples again.
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


def rehearsal_cache(run_dir: str | os.PathLike, rows: int, tokens: int, seed: int) -> Path:
    return Path(run_dir) / CODES_DIR / f"rehearsal-{rows}x{tokens}-s{seed}.json"


@torch.no_grad()
def sample_rehearsal_text(
    model, tokenizer, rows: int, tokens: int, seed: int = 0, batch_size: int = 32
) -> list[list[int]]:
    """`rows` token-id sequences of at most `tokens` new tokens each, sampled by `model` (a UniCode MLLM or any
    causal LM) from its BOS alone. The image tokens are never sampled: they are not the LLM's language."""
    if rows < 1 or tokens < 2:
        raise ValueError(f"rehearsal needs rows >= 1 and tokens >= 2, got rows={rows}, tokens={tokens}")
    bos = tokenizer.bos_token_id
    if bos is None:
        raise ValueError(
            "the tokenizer has no BOS token to start rehearsal text from; set rehearsal_fraction=0 for this LLM"
        )
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    suppressed = image_special_token_ids(model) if hasattr(getattr(model, "config", None), "vq_config") else []
    was_training = model.training
    model.eval()
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    sampled: list[list[int]] = []
    try:
        for start in range(0, rows, batch_size):
            count = min(batch_size, rows - start)
            prompt = torch.full((count, 1), bos, dtype=torch.long, device=model.device)
            # Under the autocast SFT trains with (bf16), so the rows are the distribution its forward computes.
            with torch.autocast(model.device.type, dtype=torch.bfloat16):
                out = model.generate(
                    input_ids=prompt,
                    attention_mask=torch.ones_like(prompt),
                    do_sample=True,
                    temperature=1.0,
                    top_k=0,
                    top_p=1.0,
                    max_new_tokens=tokens,
                    pad_token_id=pad,
                    suppress_tokens=suppressed or None,
                )
            for row in out[:, 1:].tolist():
                if eos is not None and eos in row:
                    row = row[: row.index(eos) + 1]  # the LLM ending its text is part of its language too
                sampled.append(row)
    finally:
        torch.random.set_rng_state(generator_state)
        model.train(was_training)
    return sampled


def _model_source(model) -> str:
    """The folder a model was loaded from, links resolved (runs that link one base share its samples); "" when it
    was built in memory."""
    name = getattr(model, "name_or_path", "") or ""
    return str(Path(name).resolve()) if name and Path(name).exists() else name


def rehearsal_dataset(
    run_dir, model, tokenizer, share: tuple[int, int], tokens: int, seed: int, features
) -> datasets.Dataset:
    """Tokenized rehearsal rows (`input_ids` = BOS + sampled text, every sampled token labelled; no image) with
    the SFT rows' `features`: `share` = (distinct samples, rows), from `rehearsal_share`. Sampled on first use and
    read from the run's cache after that while `model` is the one they were sampled from (`model=None`: the cache,
    whichever model wrote it)."""
    distinct, mixed = share
    cache = rehearsal_cache(run_dir, distinct, tokens, seed)
    cached = json.loads(cache.read_text()) if cache.is_file() else None
    source = None if model is None else _model_source(model)
    if cached is not None and source in (None, cached.get("model")):
        texts = cached["rows"]
    else:
        texts = sample_rehearsal_text(model, tokenizer, distinct, tokens, seed)
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(cache, {"rows": texts, "tokens": tokens, "seed": seed, "model": source})
    texts = [texts[i % len(texts)] for i in range(mixed)]
    bos = tokenizer.bos_token_id
    columns = {
        "input_ids": [[bos] + text for text in texts],
        "labels": [[IGNORE_INDEX] + text for text in texts],
        "image_codes": [[] for _ in texts],
    }
    if "task" in features:
        columns["task"] = [REHEARSAL_TASK] * len(texts)
    return datasets.Dataset.from_dict(columns).cast(features)


__all__ = ["REHEARSAL_TASK", "rehearsal_share", "rehearsal_cache", "sample_rehearsal_text", "rehearsal_dataset"]
