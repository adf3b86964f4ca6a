"""A user's LoRA fine-tune of a UniCode model on their own dataset (TRL SFTTrainer + PEFT).

The dataset comes in any layout of `training.data.real_images.ACCEPTED_LAYOUTS` (an imagefolder, a JSON / JSONL /
CSV file of image paths, a `save_to_disk` folder, a Hub name, a `datasets.Dataset`), one row per example
(README "Fine-tune on your own images"):
- understanding: an image + `messages`, a LLaVA-style conversation whose user turn holds one
  `{"type": "image"}` item, e.g.
  `[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "red"}]}]`
  (string contents are accepted for text-only turns);
- text-to-image: an image + a text (`text_column`; default the first of `CAPTION_COLUMNS` present) and no
  `messages` (or `messages` = null): the model learns to write the image's codes after the processor's
  image-generation prompt.
Images of any size and mode are tokenized once with the model's own visual tokenizer (`training.codes`), brought to
its resolution by the model's image processor, as at inference.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from transformers import AutoProcessor

from hub_upload.run_folder import ADAPTER_DIR

from .checkpointing import atomic_write_json
from .codes import CODES_COLUMN, encode_image_dataset
from .data.real_images import CAPTION_COLUMNS, caption_texts, load_image_dataset, pick_column
from .sft import load_unicode_model, merge_adapter
from .stage2 import run_sft, save_adapter
from .tasks import task_features, tokenize_tasks


def _item(kind, text=None, start=None, end=None):
    return {"type": kind, "text": text, "start": start, "end": end}


def _normalize_content(content, row_index: int) -> list[dict]:
    if isinstance(content, str):
        return [_item("text", content)]
    items = []
    for item in content:
        kind = item.get("type")
        if kind == "image":
            items.append(_item("image"))
        elif kind == "text":
            items.append(_item("text", item.get("text") or ""))
        else:
            raise ValueError(f"dataset[{row_index}]['messages'] has content of type {kind!r}; use 'text' or 'image'")
    return items


def user_rows_to_tasks(dataset, num_codes: int, image_generation_template: str, text_column: Optional[str] = None):
    """Rows of the documented schema (after encoding: `codes` instead of the image) -> task rows."""
    columns = set(dataset.column_names)
    text_column = pick_column(dataset.column_names, text_column, CAPTION_COLUMNS, "text", required=False)
    if CODES_COLUMN not in columns or not ("messages" in columns or text_column):
        raise ValueError(
            "the fine-tune dataset needs an image column and 'messages' (a conversation) and/or a text column such "
            "as "
            f"'caption' or 'text' (text-to-image; text_column= / --text-column names it); it has "
            f"{sorted(columns - {CODES_COLUMN}) + (['image'] if CODES_COLUMN in columns else [])}"
        )

    def convert(row, index):
        messages = row.get("messages")
        if messages:
            out = [{"role": m["role"], "content": _normalize_content(m["content"], index)} for m in messages]
            if not any(m["role"] == "assistant" for m in out):
                raise ValueError(f"dataset[{index}]['messages'] has no assistant turn to learn from")
            return {"task": "conversation", "messages": out, CODES_COLUMN: row[CODES_COLUMN]}
        caption = row.get(text_column) if text_column else None
        caption = caption_texts(caption)[0] if caption else None
        if not caption:
            raise ValueError(f"dataset[{index}] has neither messages nor a text in column {text_column!r}")
        return {
            "task": "text_to_image",
            "messages": [
                {"role": "user", "content": [_item("text", image_generation_template.format(caption=caption))]},
                {"role": "assistant", "content": [_item("boi"), _item("codes", start=0, end=num_codes), _item("eoi")]},
            ],
            CODES_COLUMN: row[CODES_COLUMN],
        }

    return dataset.map(
        convert,
        with_indices=True,
        remove_columns=dataset.column_names,
        features=task_features(),
        desc="fine-tune conversations",
    )


def finetune_lora(
    model,
    dataset,
    output_dir: str | os.PathLike,
    processor=None,
    max_steps: int = 100,
    batch_size: int = 8,
    learning_rate: float = 2e-4,
    lora_r: int = 16,
    lora_alpha: Optional[int] = None,
    target_modules: Optional[list[str]] = None,
    split: str = "train",
    image_column: str = "image",
    text_column: Optional[str] = None,
    merge: bool = False,
    trust_remote_code: Optional[bool] = None,
    resume: bool = False,
    **sft_overrides,
) -> dict:
    """Fine-tune `model` (folder, repo id or loaded model) with LoRA on `dataset` (layouts and schema above).

    The model loads with this package's classes; `trust_remote_code=True` would take the code files saved beside
    the weights instead.

    Saves the adapter (PEFT format) to `<output_dir>/adapter` and, with `merge=True`, the merged
    model + processor to `<output_dir>/merged`; `resume=True` continues from the last complete checkpoint in
    `<output_dir>/trainer`. Returns metrics and those paths."""
    output_dir = Path(output_dir)
    if isinstance(model, (str, os.PathLike)):
        base = str(model)
        processor = processor or AutoProcessor.from_pretrained(base, trust_remote_code=trust_remote_code)
        model = load_unicode_model(base, trust_remote_code=trust_remote_code)
    else:
        base = model.name_or_path
        if processor is None:
            raise ValueError("pass processor= (the model's UniCodeProcessor) when model is an already loaded model")
    data = load_image_dataset(dataset, split, image_column=image_column)
    coded = encode_image_dataset(data, model, image_column=image_column, image_processor=processor.image_processor)
    tasks = user_rows_to_tasks(
        coded, model.config.image_tokens_per_generation, processor.image_generation_template, text_column
    )
    rows = tokenize_tasks(tasks, processor, model.config.get_text_config().max_position_embeddings)
    trainer, metrics = run_sft(
        model,
        processor,
        rows,
        output_dir / "trainer",
        lora={"r": lora_r, "alpha": lora_alpha, "target_modules": target_modules},
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        save_steps=sft_overrides.pop("save_steps", max(max_steps // 2, 1)),
        resume=resume,
        settings={
            "model": base,
            "dataset": str(dataset) if isinstance(dataset, (str, os.PathLike)) else None,
            "rows": len(rows),
            "batch_size": batch_size,
            "learning_rate": learning_rate,
            "lora_r": lora_r,
            "lora_alpha": lora_alpha,
            "target_modules": target_modules,
            "split": split,
            "image_column": image_column,
            "text_column": text_column,
            "max_steps": max_steps,
            **sft_overrides,
        },
        may_differ=("max_steps",),
        **sft_overrides,
    )
    adapter = save_adapter(trainer, output_dir / ADAPTER_DIR)
    metrics["adapter"] = str(adapter)
    if merge and trainer.accelerator.is_main_process:
        if not base:
            raise ValueError("merge=True needs the base model's folder or repo id; pass model= as a path or repo id")
        metrics["merged"] = str(merge_adapter(adapter, output_dir / "merged", base=base))
    if trainer.accelerator.is_main_process:
        atomic_write_json(output_dir / "metrics.json", metrics)
    metrics["trainer"] = trainer
    return metrics


__all__ = ["user_rows_to_tasks", "finetune_lora"]
