"""Grounded attention: one attention head of the LLM's last layer is taught where an answer is read from.

A question that names a shape ("Where is the red circle?") is answered right only if some head at the answer's
position looks at that shape's image placeholders. Trained from the answers alone, the model learns a head that
finds *a* shape, whichever the scene shows, and reads its cell from there: right in one-shape scenes, at random
among several (docs/results.md, "Grounded attention"). Here the scene's own annotation says which cells the named
shapes stand in (`tasks.grounding_item`), and a term of the loss raises the share of one head's attention that falls
on them, at the position that predicts the answer's first token: -log(attention mass on the named cells), as in
supervised-attention work on VQA (Qiao et al. 2018, "Exploring Human-like Attention Supervision in Visual Question
Answering"; Liu et al. 2016, "Neural Machine Translation with Supervised Attention"). The rest of the model, and the
evaluation, are unchanged: at test time nothing says where to look.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager

import torch
from torch import nn
from transformers.models.llama.modeling_llama import rotate_half

from modeling_unicode.quantization_unicode import placeholder_coordinates

GROUNDING_KEYS = ("grounding_positions", "grounding_heads", "grounding_cells")


def placeholder_cells(config, grid: int) -> torch.Tensor:
    """(image_seq_length,) the cell (row * grid + column of a `grid` x `grid` layout over the image) that each
    input-image placeholder of a `UniCodeConfig` model lies in: the one under the placeholder's centre."""
    vq = config.vq_config
    rows, columns, _ = placeholder_coordinates(vq.code_grid_size, vq.depth, vq.quantizer, config.visual_input)
    side = int(max(rows.max(), columns.max())) + 1
    return ((2 * rows + 1) * grid // (2 * side)) * grid + (2 * columns + 1) * grid // (2 * side)


def grounding_batch(rows: list[dict]) -> dict[str, torch.Tensor]:
    """`CodesCollator`'s grounding tensors, each (B, G): query positions (-1 where a row has fewer), heads and cell
    bit masks, from the rows' `GROUNDING_KEYS` (`tasks.ConversationTokenizer(grounding=True)`)."""
    width = max((len(row["grounding_positions"]) for row in rows), default=0)
    batch = {key: torch.zeros((len(rows), width), dtype=torch.long) for key in GROUNDING_KEYS}
    batch["grounding_positions"].fill_(-1)
    for i, row in enumerate(rows):
        for key in GROUNDING_KEYS:
            batch[key][i, : len(row[key])] = torch.as_tensor(row[key], dtype=torch.long)
    return batch


def attention_layer(model) -> nn.Module:
    """The self-attention module of the LLM's last decoder layer (Llama-style: q_proj, k_proj, rotary positions,
    no query/key norms), which `grounded_attention` trains one head of."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    attention = base.model.language_model.layers[-1].self_attn
    missing = [name for name in ("q_proj", "k_proj", "head_dim", "scaling") if not hasattr(attention, name)]
    if not missing and (hasattr(attention.q_proj, "base_layer") or hasattr(attention.k_proj, "base_layer")):
        raise ValueError(
            "grounded_attention reads the last layer's query and key weights, which LoRA wraps; use lora: false"
        )
    if missing or hasattr(attention, "q_norm") or getattr(attention, "sliding_window", None):
        raise ValueError(
            f"grounded_attention needs a Llama-style attention in the LLM's last layer ({type(attention).__name__} "
            f"{'lacks ' + str(missing) if missing else 'normalizes queries or slides'}); train without it"
        )
    return attention


@contextmanager
def captured_attention_input(attention: nn.Module):
    """Records what the attention module reads in a forward (its normed hidden states and rotary cos / sin)."""
    seen: dict = {}

    def hook(_module, args, kwargs):
        seen["hidden"] = kwargs.get("hidden_states", args[0] if args else None)
        seen["rotary"] = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)

    handle = attention.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def head_attention(attention: nn.Module, seen: dict, head: int, rows, positions, attention_mask) -> torch.Tensor:
    """(N, T) the attention probabilities of `head` from query `positions` of batch `rows` over every key, recomputed
    from the captured input as the layer computes them (causal, padding masked)."""
    hidden, (cos, sin) = seen["hidden"], seen["rotary"]
    cos, sin = cos.expand(hidden.shape[0], -1, -1), sin.expand(hidden.shape[0], -1, -1)  # one table for all rows
    dim = attention.head_dim
    kv_head = head // getattr(attention, "num_key_value_groups", 1)
    query_weight = attention.q_proj.weight[head * dim : (head + 1) * dim]
    key_weight = attention.k_proj.weight[kv_head * dim : (kv_head + 1) * dim]
    query_bias = None if attention.q_proj.bias is None else attention.q_proj.bias[head * dim : (head + 1) * dim]
    key_bias = None if attention.k_proj.bias is None else attention.k_proj.bias[kv_head * dim : (kv_head + 1) * dim]
    query = nn.functional.linear(hidden[rows, positions], query_weight, query_bias)
    query = query * cos[rows, positions] + rotate_half(query) * sin[rows, positions]
    # Keys once per batch row, then gathered: a row holds several grounded answers, each of which reads all its keys.
    keys = nn.functional.linear(hidden, key_weight, key_bias)
    keys = (keys * cos + rotate_half(keys) * sin)[rows]
    scores = torch.einsum("nd,ntd->nt", query.float(), keys.float()) * attention.scaling
    steps = torch.arange(hidden.shape[1], device=hidden.device)
    allowed = (steps[None, :] <= positions[:, None]) & attention_mask[rows].bool()
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1)


GROUNDING_HEADS = ("assigned", "any")


def _named_mass(attention, seen, inputs, cells, image_token_id, head, row, slot) -> torch.Tensor:
    """(N,) the share of `head`'s attention, from the grounded answers (`row`, `slot`), on their named cells."""
    positions, masks = inputs["grounding_positions"], inputs["grounding_cells"]
    probabilities = head_attention(attention, seen, head, row, positions[row, slot], inputs["attention_mask"])
    placeholders = inputs["input_ids"][row] == image_token_id
    # The k-th placeholder of a row is its image's k-th (one image per grounded row: its answers read that image).
    order = (placeholders.cumsum(-1) - 1).clamp(min=0) % len(cells)
    named = placeholders & ((masks[row, slot][:, None] >> cells.to(order.device)[order]) & 1).bool()
    return (probabilities * named).sum(-1)


def grounding_loss(
    attention: nn.Module, seen: dict, inputs: dict, cells: torch.Tensor, image_token_id: int, heads: str = "assigned"
) -> tuple[torch.Tensor, int]:
    """(sum over the batch's grounded (answer, group) pairs of -log(attention mass on the group's cells), count).
    `heads="assigned"`: group k's mass is head k's; "any": the largest over the layer's heads, so each kind of
    question may settle on a head of its own. `cells`: `placeholder_cells`, the cell of each of an image's
    placeholders, in order."""
    if heads not in GROUNDING_HEADS:
        raise ValueError(f"grounding_heads={heads!r} is not one of {list(GROUNDING_HEADS)}")
    positions, assigned = inputs["grounding_positions"], inputs["grounding_heads"]
    rows, slots = (positions >= 0).nonzero(as_tuple=True)
    heads_of_layer = attention.q_proj.out_features // attention.head_dim
    measure = functools.partial(_named_mass, attention, seen, inputs, cells, image_token_id)
    if heads == "any":
        masses = torch.stack([measure(head, rows, slots) for head in range(heads_of_layer)], -1)
        return -torch.log(masses.max(-1).values.clamp(min=1e-6)).sum(), int(rows.numel())
    total = seen["hidden"].new_zeros((), dtype=torch.float32)
    for head in assigned[rows, slots].unique().tolist():
        if not 0 <= head < heads_of_layer:
            raise ValueError(f"a grounded answer asks for head {head}; the last layer has {heads_of_layer}")
        picked = assigned[rows, slots] == head
        total = total - torch.log(measure(head, rows[picked], slots[picked]).clamp(min=1e-6)).sum()
    return total, int(rows.numel())


__all__ = [
    "GROUNDING_KEYS",
    "GROUNDING_HEADS",
    "placeholder_cells",
    "grounding_batch",
    "attention_layer",
    "captured_attention_input",
    "head_attention",
    "grounding_loss",
]
