"""Language kept: an LLM's perplexity on held-out English prose, before the pipeline touches it and after.

The paper prefers the iterative paradigm over dual because it leaves the LLM's rows, and so its language, alone;
this is the measurement behind that. `data/held_out_english.txt` is written for this project (no model here
trained on it): everyday prose, about 870 words. Works on any causal LM and on a UniCode MLLM alike (its
backbone reads text-only ids as the LLM would).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch

from .sft import labelled_log_probs

HELD_OUT_TEXT = Path(__file__).resolve().parent / "data" / "held_out_english.txt"


@torch.no_grad()
def text_perplexity(model, tokenizer, text: Optional[str] = None, block_size: int = 512) -> dict:
    """exp(mean next-token loss) of `model` over `text` (default: the held-out English), cut into blocks of
    `block_size` tokens, each starting with the tokenizer's BOS. Only the scored positions reach the LM head,
    256 at a time (`sft.labelled_log_probs`), so a 262k-row vocabulary never needs logits for a whole block."""
    if block_size < 2:
        raise ValueError(f"block_size={block_size} must be at least 2 (a token and its successor)")
    text = HELD_OUT_TEXT.read_text(encoding="utf-8") if text is None else text
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < 2:
        raise ValueError("text has fewer than 2 tokens; pass some prose to measure perplexity on")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    step = block_size - len(bos)
    was_training = model.training
    model.eval()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        for start in range(0, len(ids), step):
            block = torch.tensor([bos + ids[start : start + step]], device=device)
            if block.shape[1] < 2:
                continue
            hidden = base.model(input_ids=block, use_cache=False).last_hidden_state[0, :-1]
            targets = block[0, 1:]
            for i in range(0, len(targets), 256):
                total -= float(labelled_log_probs(base, hidden[i : i + 256], targets[i : i + 256])[0].sum())
            count += len(targets)
    finally:
        model.train(was_training)
    return {"perplexity": math.exp(total / count), "tokens": count, "text": HELD_OUT_TEXT.name}


def language_kept(before: dict, after: dict) -> dict:
    """The report's `language` section: perplexity before and after, and the relative increase."""
    return {
        "perplexity_before": before["perplexity"],
        "perplexity_after": after["perplexity"],
        "increase": after["perplexity"] / before["perplexity"] - 1.0,
        "tokens": after["tokens"],
        "text": after["text"],
    }
