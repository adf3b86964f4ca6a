"""The machinery of stage II on top of TRL's `SFTTrainer` (+ PEFT LoRA, or full fine-tuning).

- `CodesCollator`: pads tokenized task rows and stacks the input images' codes (`image_codes`),
  which the model scatters into the `<image>` placeholders (TRL's vision collator only knows pixels).
- `unicode_lora_config`: LoRA on the LLM's linear layers only (never `lm_head`, never the visual
  tokenizer); embeddings and LM head frozen so the codebook stays unified; the `<image>`, `<boi>`,
  `<eoi>` rows trainable through `trainable_token_indices`.
- `prepare_full_finetune`: the alternative to LoRA (recipe `stage2.lora: false`) for a small LLM
  trained from scratch: the whole decoder trains, the embedding (= codebook) only on those three rows.
- `add_labelled_positions_lm_head`: on CPU, replaces TRL's fused LM head (which there scores every
  position through the vocabulary) by one that projects only the labelled positions.
- `unicode_sft_config`: `SFTConfig` that keeps our columns and runs on CPU (`use_cpu`; bf16 autocast
  when the recipe's `trainer: {bf16: auto}` finds bf16 instructions, or `true` forces it).
- Atomic checkpoints: `CompleteCheckpointCallback` marks a Trainer checkpoint `COMPLETE` only after
  every file is written; `last_complete_checkpoint` ignores unmarked (partial) folders.
- `task_losses`: held-out answer-token loss per task.
- `merge_adapter`: folds a LoRA adapter into the weights and saves an HF folder.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
import shutil
import time
import types
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from peft import LoraConfig, PeftConfig, PeftModel
from torch import nn
from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback
from trl import SFTConfig, SFTTrainer
from trl.trainer.utils import FusedCausalLMOutput

from hub_upload.export import add_remote_code
from modeling_unicode import ADDED_MODULES, IMAGE_SPECIAL_TOKENS, UniCodeConfig

from .checkpointing import (
    COMPLETE_MARKER,
    atomic_directory,
    checkpoint_step,
    is_complete,
    latest_complete_checkpoint,
    naming_corrupt_files,
    verify_weights,
)
from .data.shapes import GRID as SHAPES_GRID
from .grounding import (
    GROUNDING_HEADS,
    GROUNDING_KEYS,
    attention_layer,
    captured_attention_input,
    grounding_batch,
    grounding_loss,
    placeholder_cells,
)
from .precision import AUTO, use_bf16
from .tasks import IGNORE_INDEX


class CodesCollator:
    """Right-pads `input_ids` (pad id) / `labels` (-100), builds `attention_mask`, and stacks the
    `image_codes` of rows that have an input image into a (num_images, ĥ·ŵ·D) tensor, in row order
    (the order the model fills the placeholders). Rows with self-rehearsal references (`training.rehearsal`) give
    (B, T, k) `reference_ids` / `reference_probs`, each labelled token's set at its position, zero elsewhere."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: Optional[int] = None):
        if pad_token_id is None:
            raise ValueError("pad_token_id is None; set tokenizer.pad_token (e.g. to the eos token)")
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        for name in ("input_ids", "labels"):
            if name not in rows[0]:
                raise ValueError(
                    f"rows have no {name!r}; tokenize the task rows first with training.tasks.tokenize_tasks (got "
                    f"columns {sorted(rows[0])})"
                )
        width = max(len(r["input_ids"]) for r in rows)
        if self.pad_to_multiple_of:
            width = int(math.ceil(width / self.pad_to_multiple_of) * self.pad_to_multiple_of)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        images = []
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            ids[i, :n] = torch.as_tensor(row["input_ids"])
            labels[i, :n] = torch.as_tensor(row["labels"])
            mask[i, :n] = 1
            if row.get("image_codes"):
                images.append(torch.as_tensor(row["image_codes"], dtype=torch.long))
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if "grounding_positions" in rows[0]:
            batch.update(grounding_batch(rows))
        if images:
            batch["image_codes"] = torch.stack(images)
        references = [row.get("reference_ids") or [] for row in rows]
        if any(references):
            top_k = max(len(r[0]) for r in references if r)
            batch["reference_ids"] = torch.zeros((len(rows), width, top_k), dtype=torch.long)
            batch["reference_probs"] = torch.zeros((len(rows), width, top_k))
            for i, row in enumerate(rows):
                if not references[i]:
                    continue
                labelled = labels[i] != IGNORE_INDEX
                if int(labelled.sum()) != len(references[i]):
                    raise ValueError(
                        f"row {i} has {len(references[i])} reference sets for {int(labelled.sum())} labelled tokens; "
                        "rebuild the rehearsal rows with training.rehearsal.rehearsal_dataset"
                    )
                batch["reference_ids"][i, labelled] = torch.as_tensor(references[i], dtype=torch.long)
                batch["reference_probs"][i, labelled] = torch.as_tensor(row["reference_probs"], dtype=torch.float32)
        return batch


# -- LoRA -----------------------------------------------------------------------------------------


def language_model_linear_names(model) -> list[str]:
    """Leaf names of the `nn.Linear` layers inside the LLM decoder (q_proj, ..., down_proj)."""
    base = getattr(model, "get_base_model", lambda: model)()
    llm = base.model.language_model
    return sorted({name.rsplit(".", 1)[-1] for name, module in llm.named_modules() if isinstance(module, nn.Linear)})


def _embedding_name(model) -> str:
    llm = model.model.language_model
    embedding = llm.get_input_embeddings()
    for name, module in llm.named_modules():
        if module is embedding:
            return name.rsplit(".", 1)[-1]
    raise ValueError("the language model's input embedding is not one of its modules")


def unicode_lora_config(
    model,
    r: int = 16,
    alpha: Optional[int] = None,
    dropout: float = 0.05,
    target_modules: Optional[Sequence[str]] = None,
    train_special_tokens: bool = True,
):
    """A PEFT `LoraConfig` for a UniCode MLLM (the paper: r 128, α 256, dropout 0.05, all linear
    layers but lm_head). `target_modules` are leaf names of linear layers inside the LLM; a name that
    is not one raises, listing the ones that exist."""
    available = language_model_linear_names(model)
    targets = list(target_modules) if target_modules else available
    unknown = [t for t in targets if t not in available]
    if unknown:
        raise ValueError(
            f"target_modules {unknown} are not linear layers of the language model; choose from {available} "
            "(lm_head and the visual tokenizer are never adapted: the codebook must stay unified)"
        )
    # Anchored on the LLM decoder so a same-named layer elsewhere (the visual tokenizer) is never matched.
    pattern = r"model\.language_model\..*\.(" + "|".join(map(re.escape, targets)) + r")"
    trainable = {_embedding_name(model): image_special_token_ids(model)} if train_special_tokens else None
    base = getattr(model, "get_base_model", lambda: model)()
    added = [name for name in ADDED_MODULES if getattr(base.model, name, None) is not None]
    return LoraConfig(
        modules_to_save=added or None,  # new in stage II (position tables, adapter): trained whole, not low-rank
        r=r,
        lora_alpha=alpha if alpha is not None else 2 * r,
        lora_dropout=dropout,
        target_modules=pattern,
        trainable_token_indices=trainable,
        bias="none",
        task_type="CAUSAL_LM",
    )


def freeze_for_stage2(model) -> None:
    """Everything frozen before PEFT adds its trainable pieces (embeddings, LM head, tokenizer)."""
    model.requires_grad_(False)


def image_special_token_ids(model) -> list[int]:
    """Ids of `<image>`, `<boi>`, `<eoi>`: the only embedding rows stage II trains (never a code row)."""
    config = model.config
    ids = sorted(
        {
            int(getattr(config, f"{name}_id"))
            for name in IMAGE_SPECIAL_TOKENS
            if getattr(config, f"{name}_id") is not None
        }
    )
    codes = set(config.vq_config.codebook_token_ids)
    if any(i in codes for i in ids):  # guarded by UniCodeConfig too; a trainable code row would break unification
        raise ValueError("an image special token is also a visual code; the codebook rows must stay frozen")
    return ids


def _row_mask(table: torch.Tensor, ids) -> torch.Tensor:
    """(rows of `table`,) bool, True at the row ids given."""
    mask = torch.zeros(table.shape[0], dtype=torch.bool, device=table.device)
    mask[torch.as_tensor(ids, device=table.device)] = True
    return mask


def _train_rows(table: torch.Tensor, keep: Optional[torch.Tensor] = None) -> None:
    """Make `table` trainable on the rows `keep` marks only (None: all): the other rows' gradient is zeroed, so Adam
    (zero moments, no weight decay on zero gradients) leaves them bit-identical."""
    table.requires_grad_(True)
    if keep is not None:
        scale = keep.to(table.dtype).unsqueeze(1)
        table.register_hook(lambda grad: grad * scale.to(grad.device, grad.dtype))


def word_row_ids(tokenizer, words) -> list[int]:
    """The embedding rows `words` enter the LLM with: the tokens of each word after a space, as a sentence writes it
    (the word alone may split into pieces that other words share). Refuses anything but a non-empty list of words."""
    if isinstance(words, str) or not words or any(not isinstance(w, str) or not w.strip() for w in words):
        raise ValueError(f"train_text_embeddings={words!r}: give True, False or a non-empty list of words")
    ids = set()
    for word in words:
        ids.update(tokenizer(" " + word.strip(), add_special_tokens=False)["input_ids"])
    return sorted(ids)


def prepare_full_finetune(model, text_rows: bool | Sequence[int] = False, head_text_rows: bool = True) -> list[str]:
    """Full fine-tuning of the LLM decoder, the alternative to LoRA for a small LLM trained from scratch
    (a low-rank update is too weak a lever there). The input embedding (= the unified codebook, and the
    LM head when tied) trains only on the image special-token rows, as with LoRA, plus with `text_rows`
    every row that is not a visual code (a from-scratch LLM's stage 0 may never have seen the question
    words), or with a list of row ids those rows (`word_row_ids`). Its gradient is masked, so Adam (zero moments,
    no weight decay on zero gradients) leaves the codebook rows bit-identical. The visual tokenizer stays frozen.
    Returns the trainable parameters' names.

    An untied head (`untie_output_head`) trains whole, or with `head_text_rows=False` only on its code and image
    special rows: its text rows stay the copies of the input rows, so the hidden state that answers "red" is pushed
    towards the very row the question's "red" enters with (the `trained_code_rows` head)."""
    model.requires_grad_(False)
    llm = model.model.language_model
    embedding = llm.get_input_embeddings().weight
    for parameter in llm.parameters():
        if parameter is not embedding:
            parameter.requires_grad_(True)
    codes, special = model.config.vq_config.codebook_token_ids, image_special_token_ids(model)
    # The embedding: the image special rows, every row but the codes, or the special rows and the rows named.
    if isinstance(text_rows, bool):
        _train_rows(embedding, ~_row_mask(embedding, codes) if text_rows else _row_mask(embedding, special))
    else:
        # A named row that the codebook took is a code: it stays frozen with the codebook (which rows stage I takes
        # depends on the run, so a recipe's word may be one), and the caller is told.
        shared = set(text_rows) & set(codes)
        if shared:
            warnings.warn(
                f"text rows {sorted(shared)} are visual codes and stay frozen with the codebook", stacklevel=2
            )
        _train_rows(embedding, _row_mask(embedding, list(special) + sorted(set(text_rows) - shared)))
    head = model.get_output_embeddings()
    if head is not None and head.weight is not embedding:
        # An untied head (`untie_output_head`) is the model's own: whole, or its code and image special rows.
        _train_rows(head.weight, None if head_text_rows else _row_mask(head.weight, list(codes) + list(special)))
    for name in ADDED_MODULES:
        if getattr(model.model, name, None) is not None:
            getattr(model.model, name).requires_grad_(True)
    return [name for name, p in model.named_parameters() if p.requires_grad]


# "trained": an untied head that trains whole; "trained_code_rows": untied, only its code and image special rows train.
OUTPUT_HEADS = ("tied", "trained", "trained_code_rows")


def untie_output_head(model) -> bool:
    """Give the MLLM an LM head of its own, initialised as a copy of the tied input rows, so stage II can
    train it while the input embedding (the unified codebook) stays as stage I left it.

    Why: tied and frozen (the paper's setup with LoRA), the only way to write a code is to dot the hidden state
    with codebook rows that stage 0 never trained as outputs; a from-scratch stage-0 LM's tied softmax even pushed
    every row it never emitted along one shared direction. Unifying the codebook is about what the LLM READS;
    the head is only a readout, and Chameleon, Emu3 and Janus all train theirs. docs/results.md ("Learning
    benchmark") has the comparison. Returns True when the head was tied before."""
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (LM head) to untie")
    was_tied = head.weight is embedding or head.weight.data_ptr() == embedding.data_ptr()
    if was_tied:
        head.weight = nn.Parameter(embedding.detach().clone(), requires_grad=embedding.requires_grad)
    # transformers re-ties on load and on `tie_weights()` when the top-level config asks; the text config is
    # kept in step so an LLM extracted from the MLLM does not re-tie either.
    model.config.tie_word_embeddings = False
    text_config = model.config.get_text_config()
    if text_config is not model.config and hasattr(text_config, "tie_word_embeddings"):
        text_config.tie_word_embeddings = False
    return was_tied


def reinitialize_decoder_layers(
    model,
    seed: int = 0,
    num_layers: Optional[int] = None,
    intermediate_size: Optional[int] = None,
    num_heads: Optional[int] = None,
) -> list[str]:
    """Re-draw the LLM's decoder layers and final norm with the LLM's own initialisation, keeping the
    input embedding (= the unified codebook, and the LM head when tied) and an untied LM head.

    Why: the decoder layers of a small LM trained from scratch in stage 0 have learnt text habits;
    fine-tuned from them, the answers attend to the question and the image path starves; fresh layers over the
    same embedding table ground sooner (docs/results.md, "Stage-0 initialisation"). The rows stage I fitted
    the visual tokenizer to stay as they are. Seeded, so a run is reproducible. Returns the re-drawn names.

    `num_layers`, `intermediate_size`, `num_heads`: draw that many layers, that wide an MLP, that many attention
    heads (each head hidden_size / num_heads wide) instead of the LLM's own (the model sized for the stage-II budget;
    the embedding table, hence the codebook, depends on none of them)."""
    llm = model.model.language_model
    layers = getattr(llm, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not hasattr(llm, "_init_weights"):
        raise ValueError(
            f"reinit_decoder needs an LLM with a `layers` list of decoder layers, got {type(llm).__name__}"
        )
    text_config = model.config.get_text_config()
    shape = {
        "decoder_layers": (num_layers, "num_hidden_layers"),
        "decoder_intermediate_size": (intermediate_size, "intermediate_size"),
        "decoder_heads": (num_heads, "num_attention_heads"),
    }
    for argument, (value, _) in shape.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{argument}={value!r} must be a whole number of at least 1")
    changed = {key: value for value, key in shape.values() if value is not None and value != getattr(text_config, key)}
    if changed:
        if getattr(text_config, "layer_types", None) is not None:
            raise ValueError(
                f"{', '.join(a for a, (v, key) in shape.items() if key in changed)} cannot reshape "
                f"{type(llm).__name__}, whose layers differ by type; leave it unset"
            )
        if num_heads is not None and text_config.hidden_size % num_heads:
            raise ValueError(
                f"decoder_heads={num_heads} does not divide the LLM's width {text_config.hidden_size}; pass a divisor"
            )
        for key, value in changed.items():
            setattr(text_config, key, value)
        if "num_attention_heads" in changed:
            # Every head is as wide as the width allows and has keys and values of its own; the rotary table
            # follows the head width.
            text_config.num_key_value_heads = num_heads
            text_config.head_dim = text_config.hidden_size // num_heads
            if isinstance(getattr(llm, "rotary_emb", None), torch.nn.Module):
                device = model.get_input_embeddings().weight.device
                llm.rotary_emb = type(llm.rotary_emb)(config=text_config).to(device)
        layer_class = type(layers[0])
        count = text_config.num_hidden_layers
        llm.layers = layers = torch.nn.ModuleList(layer_class(text_config, layer_idx=i) for i in range(count))
        layers.to(model.get_input_embeddings().weight.device, model.get_input_embeddings().weight.dtype)
    parts = {
        "layers": layers,
        **({"norm": llm.norm} if isinstance(getattr(llm, "norm", None), torch.nn.Module) else {}),
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for part in parts.values():
            for parameter in part.parameters():
                parameter._is_hf_initialized = False  # transformers' init skips tensors loaded from a checkpoint
            part.apply(llm._init_weights)
    return [f"{prefix}.{name}" for prefix, part in parts.items() for name, _ in part.named_parameters()]


def redraw_text_rows(model, seed: int = 0) -> list[int]:
    """Re-draw every input-embedding row that is not a visual code (the text rows and the image special rows) with the
    LLM's own initialisation, seeded; the codebook rows and the padding row stay as they are. Returns the re-drawn ids.

    Why: fresh decoder layers (`reinitialize_decoder_layers`) that read the text through the rows a small stage-0 LM
    left behind never learn to compare a question's words with the words before it ("Is there a red circle?" after a
    caption naming every shape stays a coin), while the same layers over rows drawn afresh learn it: stage 0's rows are
    shaped for its own, discarded, layers (docs/results.md, "Text rows drawn afresh"). The codebook, which is what
    stage I unified with the LLM, is not touched, so the images' ids and rows stay those of the tokenizer."""
    table = model.get_input_embeddings()
    weight = table.weight
    keep = _row_mask(weight, model.config.vq_config.codebook_token_ids)
    if getattr(table, "padding_idx", None) is not None:
        keep[table.padding_idx] = True
    redrawn = (~keep).nonzero().flatten()
    (fresh,) = draw_at_llm_init(model, [(len(redrawn), weight.shape[1])], seed)
    with torch.no_grad():
        weight[redrawn.to(weight.device)] = fresh.to(weight.device, weight.dtype)
    return redrawn.tolist()


def draw_at_llm_init(model, shapes, seed: int) -> list[torch.Tensor]:
    """Tensors of `shapes` drawn as the LLM initialises a new row (normal, std `initializer_range`), one seeded stream
    that leaves the global RNG where it was."""
    std = model.config.get_text_config().initializer_range
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return [torch.randn(shape) * std for shape in shapes]


POSITION_INITS = ("zero", "normal")


def draw_position_tables(model, seed: int = 0) -> list[str]:
    """Draw the position tables stage II added (the input image's and the written codes') with the LLM's own
    initialisation, seeded, in place of the zeros they are created with. Returns the tables' parameter names.

    Why: RoPE puts where a token is into the attention scores, never into the values, so a head that finds a cell by
    what it holds ("the red circle") reads back where that cell is only through these tables. At zero they carry no
    position until the lookups that key on position have grown them; drawn like any new embedding row, every cell's
    values say where it is from the first step. Zero stays the start for an LLM's own layers, where a table at zero
    leaves the model computing what it did before."""
    tables = [
        (name, table)
        for name, table in (
            ("image_position_embedding", model.model.image_position_embedding),
            ("code_position_embedding", model.model.code_position_embedding),
        )
        if table is not None
    ]
    if not tables:
        raise ValueError(
            "draw_position_tables: the model has no position table; add them first (image_positions / code_positions)"
        )
    parameters = [(f"{name}.{key}", weight) for name, table in tables for key, weight in table.named_parameters()]
    fresh = draw_at_llm_init(model, [parameter.shape for _, parameter in parameters], seed)
    with torch.no_grad():
        for (_, parameter), values in zip(parameters, fresh):
            parameter.copy_(values)
    return [name for name, _ in parameters]


# -- the LM head on CPU ---------------------------------------------------------------------------


CODE_LOGITS = ("vocabulary", "code_rows")


def image_span_targets(model, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: position t sits inside an image span (a `<boi>` at or before t, no `<eoi>` since) and its
    next-token target `targets[:, t]` is a visual code. There, generation only ever samples codes
    (`UniCodeImageSpanLogitsProcessor`), so the code rows alone are the distribution that matters."""
    config = model.config
    opened = (input_ids == config.boi_token_id).cumsum(1) - (input_ids == config.eoi_token_id).cumsum(1)
    return (opened > 0) & code_rows(model, targets.device)[1][targets.clamp(min=0)].ge(0)


def code_rows(model, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(K,) the codebook's vocabulary ids and (V,) each vocabulary id's position among them (-1 for every other
    id), built once per model and device rather than at every step."""
    cached = getattr(model, "_unicode_code_rows", None)
    if cached is None or cached[0].device != device:
        ids = torch.as_tensor(model.config.vq_config.codebook_token_ids, device=device)
        vocab = model.get_input_embeddings().weight.shape[0]
        index = torch.full((vocab,), -1, dtype=torch.long, device=device)
        index[ids] = torch.arange(len(ids), device=device)
        cached = (ids, index)
        object.__setattr__(model, "_unicode_code_rows", cached)
    return cached


def reference_log_prob(
    log_probs: torch.Tensor, targets: torch.Tensor, reference_ids: torch.Tensor, reference_probs: torch.Tensor
) -> torch.Tensor:
    """(N,) minus the cross-entropy from a reference distribution known on its top k, for log-probs (N, V): over the
    k reference ids and one bucket for every other id, which holds the reference's remaining mass. Its optimum is
    the reference's own probabilities on the k ids and its mass on the rest, whichever token was drawn at that
    position; the drawn token's log-prob alone is optimised by putting all the mass on it, so a row read several
    times teaches the drawn text rather than the distribution it came from. Rows whose reference probabilities are
    all zero (not rehearsal) score the target's log-prob."""
    known = reference_probs > 0
    # One gather for the reference ids and the drawn token: each gather's backward is a (N, V) buffer.
    picked = log_probs.gather(-1, torch.cat([reference_ids, targets.unsqueeze(-1)], -1))
    head_log_probs, drawn = picked[:, :-1], picked[:, -1]
    head = (head_log_probs * reference_probs).sum(-1)
    head_mass = (head_log_probs.exp() * known).sum(-1)
    rest = (1.0 - reference_probs.sum(-1)).clamp(min=0.0)
    distilled = head + rest * torch.log1p(-head_mass.clamp(max=1.0 - 1e-6))
    return torch.where(known.any(-1), distilled, drawn)


def labelled_log_probs(
    model,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    on_code_rows: Optional[torch.Tensor] = None,
    reference: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
):
    """(log-prob of each target, entropy, is-top-1) for hidden states `hidden` (N, H) of labelled positions.
    Positions in `on_code_rows` (N,) bool are scored over the K code rows only (`image_span_targets`), the rest
    over the whole vocabulary: with a 262k-row vocabulary the full head on every code of a drawn image is most
    of a step. `reference` = ((N, k) ids, (N, k) probabilities): where given (non-zero), the "log-prob" is
    `reference_log_prob` (self-rehearsal's distribution targets)."""
    head = model.get_output_embeddings()
    picked = hidden.new_zeros(len(targets), dtype=torch.float32)
    entropy, is_top1 = torch.zeros_like(picked), torch.zeros_like(picked)
    groups = [(None, torch.ones_like(targets, dtype=torch.bool) if on_code_rows is None else ~on_code_rows)]
    if on_code_rows is not None:
        groups.append((code_rows(model, targets.device), on_code_rows))
    for codes, rows in groups:
        if not rows.any():
            continue
        if codes is None:
            log_probs, wanted = head(hidden[rows]).float().log_softmax(-1), targets[rows]
        else:
            ids, index = codes
            logits = hidden[rows] @ head.weight[ids.to(hidden.device)].T.to(hidden.dtype)
            log_probs, wanted = logits.float().log_softmax(-1), index[targets[rows]]
        if codes is None and reference is not None:
            value = reference_log_prob(log_probs, wanted, reference[0][rows], reference[1][rows])
        else:
            value = log_probs.gather(-1, wanted.unsqueeze(-1)).squeeze(-1)
        picked = picked.masked_scatter(rows, value)
        with torch.no_grad():
            entropy[rows] = -(log_probs.exp() * log_probs).sum(-1)
            is_top1[rows] = (log_probs.argmax(-1) == wanted).float()
    return picked, entropy, is_top1


def add_labelled_positions_lm_head(model, code_logits: str = "vocabulary") -> None:
    """Replace TRL's fused LM head (`fused_lm_head=True` forwards) by one that projects only the
    positions whose next-token label is not -100, with plain torch ops; with `code_logits="code_rows"` the codes
    of a written image are scored over the code rows only (`labelled_log_probs`).

    Why: without Triton (CPU) TRL's chunked log-prob function scores EVERY position through the whole
    vocabulary in an autograd function folded in torch, most of a CPU training step on the tiny preset
    (docs/results.md, "The LM head on CPU"). Stage-II rows label few positions (a VQA answer is 3 of ~90 tokens), so
    projecting only those costs a fraction of full logits. Same loss and per-token fields as TRL's
    `FusedCausalLMOutput` (entropy and top-1 only feed its metrics, without gradient). Call it after
    `SFTTrainer` is built (it patches the model then); PEFT and DDP wrappers still route through it."""
    if code_logits not in CODE_LOGITS:
        raise ValueError(f"code_logits={code_logits!r} is not one of {list(CODE_LOGITS)}")
    original = type(model).forward

    @functools.wraps(original)
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        reference = [kwargs.pop(name, None) for name in ("reference_ids", "reference_probs")]
        reference = None if reference[0] is None else reference
        if not fused_lm_head:
            extra = {"labels": labels, "shift_labels": shift_labels, "num_items_in_batch": num_items_in_batch}
            return original(self, *args, **kwargs, **{k: v for k, v in extra.items() if v is not None})
        kwargs["use_cache"] = False
        input_ids = kwargs.get("input_ids")
        hidden = self.model(*args, **kwargs).last_hidden_state
        if shift_labels is None:
            hidden, labels = hidden[:, :-1], labels[:, 1:]
            input_ids = None if input_ids is None else input_ids[:, :-1]
            reference = None if reference is None else [r[:, 1:] for r in reference]
        else:
            labels = shift_labels
        mask = labels != IGNORE_INDEX
        on_code_rows = None
        if code_logits == "code_rows" and input_ids is not None:
            on_code_rows = image_span_targets(self, input_ids, labels)[mask]
        if reference is not None:
            reference = [r.to(hidden.device)[mask] for r in reference]
        picked, entropy, is_top1 = labelled_log_probs(self, hidden[mask], labels[mask], on_code_rows, reference)
        # masked_scatter keeps an all-ignored batch connected to the graph (a differentiable zero).
        per_token = [picked.new_zeros(mask.shape).masked_scatter(mask, x) for x in (picked, entropy, is_top1)]
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(
            loss=-per_token[0].sum() / count,
            log_probs=per_token[0],
            entropy=per_token[1],
            is_top1=per_token[2],
            label_mask=mask,
        )

    model.forward = types.MethodType(forward, model)


# -- the trainer: loss per row, wall-clock budgets -------------------------------------------------

LOSS_NORMALIZATIONS = ("token", "row")


class WallClockBudget(TrainerCallback):
    """Train for `seconds` of wall clock instead of a number of steps: the learning rate follows warm-up
    then cosine over the elapsed FRACTION of the budget, and training stops when it is spent.

    Why: recipes that change the cost of a step (longer rows, a bigger head, more data) are only comparable
    at equal seconds, and a step schedule would end each of them at a different point of its cosine.
    The clock starts at the first step and is not carried over a resume."""

    def __init__(self, seconds: float, warmup_fraction: float = 0.03):
        if not seconds > 0:
            raise ValueError(f"max_seconds={seconds!r} must be a positive number of seconds")
        self.seconds = float(seconds)
        self.warmup_fraction = float(warmup_fraction)
        self.started: Optional[float] = None

    def elapsed_fraction(self) -> float:
        return 0.0 if self.started is None else min(1.0, (time.perf_counter() - self.started) / self.seconds)

    def lr_factor(self, _step: int) -> float:
        fraction = self.elapsed_fraction()
        if fraction < self.warmup_fraction:
            return max(fraction / self.warmup_fraction, 0.01)
        progress = (fraction - self.warmup_fraction) / max(1e-9, 1.0 - self.warmup_fraction)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.elapsed_fraction() >= 1.0:
            control.should_training_stop = True
        return control


class FirstRowsSampler(torch.utils.data.Sampler):
    """A two-phase curriculum: the first `first_samples` rows drawn come from `first_rows` only, every later one from
    the other rows. Each phase reshuffles its rows on every pass through them.

    The draws are one seeded stream that the Trainer reads `len(self)` rows per epoch (`set_epoch`), so a resumed run
    draws the rows it would have drawn."""

    def __init__(self, num_rows: int, first_rows, first_samples: int, seed: int = 0):
        self.first_rows = sorted({int(i) for i in first_rows})
        outside = [i for i in (self.first_rows[:1] + self.first_rows[-1:]) if not 0 <= i < num_rows]
        if outside:
            raise ValueError(f"first_rows must index the {num_rows} training rows, got {outside[0]}")
        if first_samples and not self.first_rows:
            raise ValueError(f"first_samples={first_samples} needs rows to draw them from; first_rows is empty")
        chosen = set(self.first_rows)
        self.later_rows = [i for i in range(num_rows) if i not in chosen]
        if not self.later_rows:
            raise ValueError("first_rows holds every training row; the later phase would have none to draw")
        self.first_samples, self.seed, self.epoch = int(first_samples), int(seed), 0

    def __len__(self) -> int:
        return len(self.later_rows)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @staticmethod
    def _cycled(rows: list[int], count: int, generator: torch.Generator) -> list[int]:
        order: list[int] = []
        while len(order) < count:
            order += [rows[i] for i in torch.randperm(len(rows), generator=generator).tolist()]
        return order[:count]

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed)
        start, end = self.epoch * len(self), (self.epoch + 1) * len(self)
        stream = self._cycled(self.first_rows, min(end, self.first_samples), generator)
        stream += self._cycled(self.later_rows, end - len(stream), generator)
        return iter(stream[start:end])


def split_by_length(batch: dict, image_token_id: int, image_seq_length: int) -> list[dict]:
    """A right-padded batch (`CodesCollator`'s) as two micro-batches of its rows sorted by length, each cut to its own
    longest row, split where the two together hold the fewest padded tokens. A batch of one row comes back whole.

    Why: a step's rows differ in length (a VQA conversation with its image and several turns is several times a
    caption row), so padding every row to the longest leaves a large share of a CPU step computing on padding. Right
    padding and the causal mask keep each row's outputs what they were, so the two halves' losses add up to the
    batch's (`UniCodeSFTTrainer`'s `length_split`); the rows of a step stay mixed across tasks, which a length-grouped
    sampler loses (docs/results.md, "Batches of one length")."""
    lengths = batch["attention_mask"].sum(-1)
    rows = len(lengths)
    if rows < 2:
        return [batch]
    order = torch.argsort(lengths, stable=True)
    ordered = lengths[order].tolist()
    cut = min(range(1, rows), key=lambda k: k * ordered[k - 1] + (rows - k) * ordered[-1])
    placeholders = (batch["input_ids"] == image_token_id).sum(-1)
    images_per_row = torch.div(placeholders, image_seq_length, rounding_mode="floor")
    if "image_codes" in batch and int(images_per_row.sum()) != len(batch["image_codes"]):
        raise ValueError(
            f"the batch holds {int(placeholders.sum())} image placeholders for {len(batch['image_codes'])} images of "
            f"{image_seq_length}; build it with CodesCollator from tokenize_tasks rows"
        )
    first_image = torch.cumsum(images_per_row, 0) - images_per_row
    parts = []
    for chosen in (order[:cut], order[cut:]):
        width = int(lengths[chosen].max())
        part = {}
        for key, value in batch.items():
            if key == "image_codes":
                start, count = first_image[chosen].tolist(), images_per_row[chosen].tolist()
                picked = [i for first, n in zip(start, count) for i in range(first, first + n)]
                if picked:
                    part[key] = value[picked]
            elif isinstance(value, torch.Tensor) and value.shape[:2] == batch["attention_mask"].shape:
                part[key] = value[chosen, :width]
            elif key in GROUNDING_KEYS:  # (rows, answers): positions stay inside the row's first `width` tokens
                part[key] = value[chosen]
            else:
                raise ValueError(f"split_by_length does not know how to split the batch's {key!r}")
        parts.append(part)
    return parts


def _sft_trainer_class():
    """`SFTTrainer` with the stage-II loss options."""

    class UniCodeSFTTrainer(SFTTrainer):
        """TRL's `SFTTrainer` plus two stage-II options:

        - `loss_normalization="row"`: every row's loss is the mean over its own labelled tokens, and the batch
          loss the mean over rows. TRL's default ("token") averages over all labelled tokens of the batch, so a
          text-to-image row (one label per code) outweighs a VQA row (a one-word answer) a hundredfold, and the
          shared layers learn to draw long before they learn to look;
        - `wall_clock`: a `WallClockBudget`, whose schedule replaces the step-based one;
        - `first_rows` / `first_steps`: the first steps train on those rows only, the rest on the others
          (`FirstRowsSampler`);
        - `length_split`: each training batch runs as two length-sorted micro-batches (`split_by_length`), whose
          losses add up to the batch's: the same step in fewer padded tokens (single-process runs; a DDP rank runs
          its batch whole).
        """

        def __init__(
            self,
            *args,
            loss_normalization: str = "token",
            wall_clock: Optional[WallClockBudget] = None,
            first_rows=None,
            first_steps: int = 0,
            length_split: bool = False,
            grounded_attention: float = 0.0,
            grounding_heads: str = "assigned",
            **kwargs,
        ):
            if loss_normalization not in LOSS_NORMALIZATIONS:
                raise ValueError(
                    f"loss_normalization={loss_normalization!r} is not one of {list(LOSS_NORMALIZATIONS)}"
                )
            self.loss_normalization = loss_normalization
            self.wall_clock = wall_clock
            self.first_rows, self.first_steps = first_rows, int(first_steps)
            self._parameter_count: Optional[int] = None  # floating_point_ops counts them once
            callbacks = list(kwargs.pop("callbacks", None) or []) + ([wall_clock] if wall_clock is not None else [])
            super().__init__(*args, callbacks=callbacks, **kwargs)
            if loss_normalization == "row":
                self.loss_is_scaled_for_ga = False  # a mean per micro-batch: Trainer averages over accumulation steps
            # length_split, resolved once: where a row's image placeholders are (split_by_length hands each part the
            # images of its rows), or None when batches run whole. One process only: under DDP two forwards before one
            # backward would mark each gradient ready twice.
            config = getattr(self.model, "get_base_model", lambda: self.model)().config
            self.split_image_layout = None
            if length_split and self.accelerator.num_processes == 1:
                self.split_image_layout = (config.image_token_id, config.image_seq_length)
            # grounded_attention (training.grounding): the weight of the term that teaches one head of the last layer
            # to look at the shapes a question names, and what it needs, resolved once.
            self.grounded_attention = float(grounded_attention)
            if grounding_heads not in GROUNDING_HEADS:
                raise ValueError(f"grounding_heads={grounding_heads!r} is not one of {list(GROUNDING_HEADS)}")
            if self.grounded_attention:
                self.grounding_layer = attention_layer(self.model)
                self.grounding_cells = placeholder_cells(config, SHAPES_GRID)
                self.grounding_image_token = config.image_token_id
                self.grounding_heads = grounding_heads

        def _get_train_sampler(self, train_dataset=None):
            if self.first_rows is None:
                return super()._get_train_sampler(train_dataset)
            rows = len(train_dataset if train_dataset is not None else self.train_dataset)
            # Rows per optimizer step on this process; each process's shard of the batches is drawn from one stream.
            per_step = self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps
            per_step *= self.args.world_size
            return FirstRowsSampler(rows, self.first_rows, self.first_steps * per_step, self.args.seed)

        def create_scheduler(self, num_training_steps: int, optimizer=None):
            if self.wall_clock is None:
                return super().create_scheduler(num_training_steps, optimizer)
            if self.lr_scheduler is None:
                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                    optimizer or self.optimizer, self.wall_clock.lr_factor
                )
                self._created_lr_scheduler = True
            return self.lr_scheduler

        def floating_point_ops(self, inputs) -> int:
            # Trainer's estimate (6 x tokens x non-embedding parameters) recounts the parameters by walking every
            # module at every step, a measurable share of a tiny model's CPU step; the count cannot change in training.
            main_input = getattr(self.model, "main_input_name", "input_ids")
            if main_input not in inputs or not hasattr(self.model, "num_parameters"):
                return 0
            if self._parameter_count is None:
                self._parameter_count = self.model.num_parameters(exclude_embeddings=True)
            return 6 * inputs[main_input].numel() * self._parameter_count

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            grounded = 0
            if self.grounded_attention and "grounding_positions" in inputs:
                grounded = int((inputs["grounding_positions"] >= 0).sum())
            self._grounding_of_step = 0.0
            if self.split_image_layout is not None and self.model.training and not return_outputs:
                parts = split_by_length(inputs, *self.split_image_layout)
                if len(parts) > 1:
                    loss = self._loss_of_parts(model, parts, num_items_in_batch, grounded)
                    self._log_grounding(grounded)
                    return loss
            result = self._batch_loss(model, inputs, return_outputs, num_items_in_batch, grounded)
            self._log_grounding(grounded)
            return result

        def _log_grounding(self, grounded: int) -> None:
            if grounded and self.model.training:  # the step's mean -log(mass on the named cells), logged as a loss
                self._metrics["train"].setdefault("grounding_loss", []).append(self._grounding_of_step)

        def _batch_loss(
            self, model, inputs, return_outputs=False, num_items_in_batch=None, grounded: int = 0, share: float = 1.0
        ):
            # `share`: the part's weight in its batch's answer loss (`_loss_of_parts`). The grounding term is the mean
            # over the whole batch's grounded answers (`grounded`, counted before any split), so a split batch's parts
            # add up to it as their answer losses do.
            grounding = {key: inputs.pop(key) for key in GROUNDING_KEYS if key in inputs}
            grounds = bool(grounded and self.model.training and grounding)
            with captured_attention_input(self.grounding_layer) if grounds else contextlib.nullcontext() as seen:
                result = self._answer_loss(model, inputs, return_outputs, num_items_in_batch)
            if share != 1.0:  # only for a part of a split batch, never with return_outputs
                result = result * share
            if not grounds:
                return result
            total, _ = grounding_loss(
                self.grounding_layer,
                seen,
                {**inputs, **grounding},
                self.grounding_cells,
                self.grounding_image_token,
                self.grounding_heads,
            )
            term = self.grounded_attention * total / grounded
            self._grounding_of_step += float(total.detach()) / grounded
            if return_outputs:
                return result[0] + term, result[1]
            return result + term

        def _loss_of_parts(self, model, parts, num_items_in_batch, grounded: int = 0):
            # Each part's loss weighted so that the sum is the whole batch's: its share of the labelled tokens (or of
            # the labelled rows, for "row"), unless num_items_in_batch already divides every part by the batch's count.
            labelled = [part["labels"][:, 1:] != IGNORE_INDEX for part in parts]
            if self.loss_normalization == "row":
                counts = [int(mask.any(-1).sum()) for mask in labelled]
            else:
                counts = [int(mask.sum()) for mask in labelled]
            total = max(sum(counts), 1)
            loss = 0.0
            for part, count in zip(parts, counts):
                if self.loss_normalization == "token" and num_items_in_batch is not None:
                    loss = loss + self._batch_loss(model, part, False, num_items_in_batch, grounded)
                else:
                    loss = loss + self._batch_loss(model, part, False, None, grounded, share=count / total)
            return loss

        def _answer_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.loss_normalization == "token" or return_outputs:
                return super().compute_loss(
                    model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
                )
            inputs["use_cache"] = False
            outputs = model(**inputs, fused_lm_head=True)
            labelled = outputs.label_mask.sum(-1)
            rows = labelled > 0
            per_row = -outputs.log_probs.sum(-1) / labelled.clamp(min=1)
            loss = per_row[rows].sum() / rows.sum().clamp(min=1)
            if self.model.training:
                self._total_train_tokens += int(
                    self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum()
                )
                self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
            return loss

    return UniCodeSFTTrainer


# -- SFTConfig ------------------------------------------------------------------------------------


def sft_uses_bf16(overrides: dict) -> bool:
    """Whether `unicode_sft_config(output_dir, **overrides)` trains under bf16 autocast: its `bf16` (default: bf16 on a
    CUDA GPU that supports it, float32 on CPU) resolved for the device it trains on. What runs beside the trainer in
    the trainer's precision (self-rehearsal sampling) asks here."""
    cuda = torch.cuda.is_available() and not overrides.get("use_cpu", False)
    return use_bf16(overrides.get("bf16", AUTO if cuda else False), "cuda" if cuda else "cpu")


def unicode_sft_config(output_dir: str | os.PathLike, **overrides):
    """`SFTConfig` for code-column datasets. On CPU: `use_cpu=True`, fp32 unless `bf16=True` is passed
    (autocast: faster steps on CPUs with bf16 instructions; `bf16="auto"` turns it on only there), no gradient
    checkpointing (slower there, and memory is not the limit); with CUDA: bf16 where supported,
    checkpointing on."""
    cuda = torch.cuda.is_available() and not overrides.get("use_cpu", False)
    # transformers 5.24 renamed gradient_checkpointing to activation_checkpointing (the old name warns,
    # and goes in v6); older 5.x only know the old one. Either spelling in a recipe means the same.
    checkpointing = (
        "activation_checkpointing"
        if "activation_checkpointing" in getattr(SFTConfig, "__dataclass_fields__", {})
        else "gradient_checkpointing"
    )
    overrides = {
        checkpointing if k in ("gradient_checkpointing", "activation_checkpointing") else k: v
        for k, v in overrides.items()
    }
    defaults: dict[str, Any] = {
        "output_dir": str(output_dir),
        "use_cpu": not cuda,
        "bf16": AUTO if cuda else False,
        "fp16": False,
        checkpointing: cuda,
        # Our collator needs `image_codes`/`task`; TRL would prune them and re-tokenize `messages`.
        "remove_unused_columns": False,
        "dataset_kwargs": {"skip_prepare_dataset": True},
        "max_length": None,
        "report_to": "none",
        "save_strategy": "steps",
        "save_steps": 100,
        # The newest complete checkpoint plus the one being written: a long run kept every one
        # (12,000 steps of `tiny` every 50 = 19 GB) and filled the disk.
        "save_total_limit": 2,
        "logging_steps": 10,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 0,
        "learning_rate": 2e-4,
        "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 8,
        "dataloader_num_workers": 0,
        "disable_tqdm": False,
        # Every trainable parameter (decoder, LM rows, LoRA matrices) takes part in every step and the visual
        # tokenizer is frozen, so DDP's search for unused parameters, which Trainer turns on whenever checkpointing
        # is off, is a wasted autograd-graph traversal per step (and a warning from every rank).
        "ddp_find_unused_parameters": False,
    }
    defaults.update(overrides)
    defaults["bf16"] = sft_uses_bf16(overrides)
    if defaults["use_cpu"] and os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        # accelerate builds a CPU run's Accelerator as plain multi-CPU DDP and ignores the launch config's FSDP.
        warnings.warn(
            "`accelerate launch` asked for FSDP, but this run is on CPU (use_cpu=True), where accelerate trains "
            "with plain DDP: every rank holds the whole model. Shard on GPUs, or launch with "
            "configuration/accelerate/ddp.yaml to say what runs.",
            UserWarning,
            stacklevel=2,
        )
    return SFTConfig(**defaults)


# -- atomic checkpoints ---------------------------------------------------------------------------


def _checkpoint_step(path: Path) -> int:
    return checkpoint_step(path, "checkpoint-")


def last_complete_checkpoint(output_dir: str | os.PathLike) -> Optional[Path]:
    """The highest-step Trainer `checkpoint-N` carrying the COMPLETE marker."""
    return latest_complete_checkpoint(output_dir, "checkpoint-")


def remove_partial_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Delete `checkpoint-N` folders without the marker (what an interrupted save leaves)."""
    folder = Path(output_dir)
    removed = []
    if folder.is_dir():
        for path in folder.iterdir():
            if path.is_dir() and _checkpoint_step(path) >= 0 and not is_complete(path):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


class CompleteCheckpointCallback(TrainerCallback):
    """`on_save` runs after `Trainer._save_checkpoint` has written every file of every rank's part;
    only then is the folder marked COMPLETE (after a barrier when distributed)."""

    def on_save(self, args, state, control, **kwargs):
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
        if state.is_world_process_zero:
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if path.is_dir():
                for file in path.rglob("*"):  # on disk before the marker says so
                    if file.is_file():
                        with open(file, "rb") as handle:
                            os.fsync(handle.fileno())
                (path / COMPLETE_MARKER).write_text("ok\n")
        return control


# -- evaluation -----------------------------------------------------------------------------------


@torch.no_grad()
def task_losses(
    model,
    datasets_by_task: dict,
    collator: CodesCollator,
    batch_size: int = 16,
    max_rows: Optional[int] = None,
    code_logits: str = "vocabulary",
    chunk: int = 256,
) -> dict[str, float]:
    """Mean next-token loss over answer tokens, per task, scored as training scores them (`labelled_log_probs`,
    `code_logits`): only labelled positions reach the LM head, `chunk` at a time, so a 262k-row vocabulary never
    holds logits for a whole batch."""
    was_training = model.training
    model.eval()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT layers sit inside it
    device = next(model.parameters()).device
    out = {}
    try:
        for task, dataset in datasets_by_task.items():
            rows = list(dataset) if max_rows is None else [dataset[i] for i in range(min(max_rows, len(dataset)))]
            total, count = 0.0, 0
            for start in range(0, len(rows), batch_size):
                batch = {k: v.to(device) for k, v in collator(rows[start : start + batch_size]).items()}
                labels = batch.pop("labels")[:, 1:]
                hidden = base.model(**batch, use_cache=False).last_hidden_state[:, :-1]
                mask = labels != IGNORE_INDEX
                on_code_rows = (
                    image_span_targets(base, batch["input_ids"][:, :-1], labels)[mask]
                    if code_logits == "code_rows"
                    else None
                )
                hidden, targets = hidden[mask], labels[mask]
                for i in range(0, len(targets), chunk):
                    part = None if on_code_rows is None else on_code_rows[i : i + chunk]
                    picked = labelled_log_probs(base, hidden[i : i + chunk], targets[i : i + chunk], part)[0]
                    total -= float(picked.sum())
                count += len(targets)
            out[task] = total / max(count, 1)
    finally:
        model.train(was_training)
    return out


# -- merge ----------------------------------------------------------------------------------------


def load_unicode_model(path: str | os.PathLike, dtype=torch.float32, **kwargs):
    """A UniCode MLLM folder or repo id (our classes are registered on import; `trust_remote_code`
    loads a Hub export)."""
    if Path(path).is_dir():
        verify_weights(path)
    config_file = Path(path) / "config.json"
    with naming_corrupt_files(path):
        model_type = json.loads(config_file.read_text()).get("model_type") if config_file.is_file() else None
        if model_type is not None and model_type != UniCodeConfig.model_type:
            raise ValueError(
                f"{path} holds a {model_type!r} model, not a UniCode MLLM (model_type {UniCodeConfig.model_type!r}); "
                "pass a run's mllm/ or an `unicode-mllm export` folder. A plain causal LM is where a run starts: "
                "train-tokenizer --llm"
            )
        model, loading = AutoModelForImageTextToText.from_pretrained(
            str(path), dtype=dtype, output_loading_info=True, **kwargs
        )
    # transformers only logs weights that do not fit the config (a layer dropped, one left random); a model
    # loaded that way answers wrongly without a word, so it is refused.
    mismatched = {k: sorted(v) for k, v in loading.items() if k in ("missing_keys", "unexpected_keys") and v}
    if mismatched:
        listed = "; ".join(
            f"{k.replace('_', ' ')}: {', '.join(v[:4])}{' ...' if len(v) > 4 else ''}" for k, v in mismatched.items()
        )
        raise ValueError(
            f"the weights in {path} do not match its config.json ({listed}); the config was edited or belongs "
            "to other weights: save the model again with save_pretrained"
        )
    return model


def load_adapter_model(base: str | os.PathLike, adapter: str | os.PathLike, **kwargs):
    """`PeftModel.from_pretrained(base model, adapter folder)`."""
    return PeftModel.from_pretrained(load_unicode_model(base, **kwargs), str(adapter))


def require_adapter_folder(adapter: str | os.PathLike) -> Path:
    """`adapter` as a Path, if it is a PEFT adapter folder; else a ValueError that says which folder to pass."""
    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise ValueError(
            f"adapter={str(adapter)!r} holds no adapter_config.json; pass the folder a stage-II run or "
            "`unicode-mllm finetune` saved (its adapter/)"
        )
    return adapter


def merge_adapter(
    adapter: str | os.PathLike,
    output: str | os.PathLike,
    base: Optional[str | os.PathLike] = None,
    processor=None,
) -> Path:
    """Fold a LoRA adapter into its base model and save an HF folder (model + processor) atomically.

    `base` defaults to the adapter's `base_model_name_or_path`; the processor saved is `processor` (stage II's,
    which records how the model was trained to be asked), else the base folder's."""
    adapter = require_adapter_folder(adapter)
    base = base or PeftConfig.from_pretrained(str(adapter)).base_model_name_or_path
    if not base:
        raise ValueError("the adapter records no base model; pass base= the model folder it was trained on")
    model = load_adapter_model(base, adapter).merge_and_unload()
    processor = processor or AutoProcessor.from_pretrained(str(base))
    return save_mllm(model, processor, output)


def save_mllm(model, processor, folder: str | os.PathLike) -> Path:
    """An MLLM folder (model + processor), atomically, that also loads with `trust_remote_code=True` alone
    (`hub_upload.export.add_remote_code`): without `import modeling_unicode`, transformers would otherwise
    answer with its "update Transformers" message."""
    with atomic_directory(folder) as staging:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        add_remote_code(staging)
    return Path(folder)


__all__ = [
    "CodesCollator",
    "FirstRowsSampler",
    "language_model_linear_names",
    "unicode_lora_config",
    "freeze_for_stage2",
    "image_special_token_ids",
    "prepare_full_finetune",
    "word_row_ids",
    "OUTPUT_HEADS",
    "untie_output_head",
    "reinitialize_decoder_layers",
    "redraw_text_rows",
    "split_by_length",
    "POSITION_INITS",
    "draw_position_tables",
    "LOSS_NORMALIZATIONS",
    "WallClockBudget",
    "CODE_LOGITS",
    "image_span_targets",
    "labelled_log_probs",
    "add_labelled_positions_lm_head",
    "unicode_sft_config",
    "last_complete_checkpoint",
    "remove_partial_checkpoints",
    "CompleteCheckpointCallback",
    "task_losses",
    "load_unicode_model",
    "load_adapter_model",
    "require_adapter_folder",
    "merge_adapter",
    "save_mllm",
]
