"""A user's LoRA fine-tune of a UniCode model on their own dataset (TRL SFTTrainer + PEFT).

Dataset schema (one row per example; README "Fine-tune with LoRA"):
- understanding: `image` (PIL image / `datasets.Image`) + `messages`, a LLaVA-style conversation
  whose user turn holds one `{"type": "image"}` item, e.g.
  `[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "red"}]}]`
  (string contents are accepted for text-only turns);
- text-to-image: `image` + `caption` and no `messages` (or `messages` = null): the model learns to
  write the image's codes after the processor's image-generation prompt.
Images are tokenized once with the model's own visual tokenizer (`training.codes`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from .checkpointing import atomic_write_json
from .codes import CODES_COLUMN, encode_image_dataset
from .tasks import task_features, tokenize_tasks


def load_user_dataset(dataset, split: str = "train"):
    """A `datasets.Dataset` from a Dataset, a `save_to_disk` folder, a JSON/JSONL file or a Hub name."""
    import datasets

    if isinstance(dataset, datasets.DatasetDict):
        dataset = dataset[split]
    if isinstance(dataset, datasets.Dataset):
        return dataset
    if not isinstance(dataset, (str, os.PathLike)):
        raise TypeError(f"dataset must be a datasets.Dataset, a folder, a JSON file or a Hub name, got {type(dataset).__name__}")
    path = Path(dataset)
    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
    elif path.suffix in (".json", ".jsonl"):
        loaded = datasets.load_dataset("json", data_files=str(path), split=split)
    else:
        loaded = datasets.load_dataset(str(dataset), split=split)
    return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded


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


def user_rows_to_tasks(dataset, num_codes: int, image_generation_template: str):
    """Rows of the documented schema (after encoding: `codes` instead of `image`) -> task rows."""
    columns = set(dataset.column_names)
    if CODES_COLUMN not in columns or not ({"messages", "caption"} & columns):
        raise ValueError(
            f"the fine-tune dataset needs an 'image' column and 'messages' (a conversation) and/or 'caption' "
            f"(text-to-image); it has {sorted(columns - {CODES_COLUMN}) + (['image'] if CODES_COLUMN in columns else [])}"
        )

    def convert(row, index):
        messages = row.get("messages")
        if messages:
            out = [{"role": m["role"], "content": _normalize_content(m["content"], index)} for m in messages]
            if not any(m["role"] == "assistant" for m in out):
                raise ValueError(f"dataset[{index}]['messages'] has no assistant turn to learn from")
            return {"task": "conversation", "messages": out, CODES_COLUMN: row[CODES_COLUMN]}
        caption = row.get("caption")
        if not isinstance(caption, str):
            raise ValueError(f"dataset[{index}] has neither messages nor a caption string")
        return {
            "task": "text_to_image",
            "messages": [
                {"role": "user", "content": [_item("text", image_generation_template.format(caption=caption))]},
                {"role": "assistant", "content": [_item("boi"), _item("codes", start=0, end=num_codes), _item("eoi")]},
            ],
            CODES_COLUMN: row[CODES_COLUMN],
        }

    return dataset.map(convert, with_indices=True, remove_columns=dataset.column_names, features=task_features(),
                       desc="fine-tune conversations")


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
    merge: bool = False,
    trust_remote_code: bool = True,
    resume: bool = False,
    **sft_overrides,
) -> dict:
    """Fine-tune `model` (folder, repo id or loaded model) with LoRA on `dataset` (schema above).

    Saves the adapter (PEFT format) to `<output_dir>/adapter` and, with `merge=True`, the merged
    model + processor to `<output_dir>/merged`; `resume=True` continues from the last complete checkpoint in
    `<output_dir>/trainer`. Returns metrics and those paths."""
    from transformers import AutoProcessor

    from .sft import load_unicode_model, merge_adapter
    from .stage2 import run_sft, save_adapter

    output_dir = Path(output_dir)
    if isinstance(model, (str, os.PathLike)):
        base = str(model)
        processor = processor or AutoProcessor.from_pretrained(base, trust_remote_code=trust_remote_code)
        model = load_unicode_model(base, trust_remote_code=trust_remote_code)
    else:
        base = model.name_or_path
        if processor is None:
            raise ValueError("pass processor= (the model's UniCodeProcessor) when model is an already loaded model")
    data = load_user_dataset(dataset, split)
    if image_column not in data.column_names:
        raise ValueError(
            f"the fine-tune dataset has no {image_column!r} column (columns: {data.column_names}); every row needs an "
            "image (pass image_column= if it is named differently)"
        )
    coded = encode_image_dataset(data, model, image_column=image_column)
    tasks = user_rows_to_tasks(coded, model.config.image_tokens_per_generation, processor.image_generation_template)
    rows = tokenize_tasks(tasks, processor, model.config.get_text_config().max_position_embeddings)
    trainer, metrics = run_sft(
        model, processor, rows, output_dir / "trainer", lora={"r": lora_r, "alpha": lora_alpha, "target_modules": target_modules},
        max_steps=max_steps, per_device_train_batch_size=batch_size, learning_rate=learning_rate,
        save_steps=sft_overrides.pop("save_steps", max(max_steps // 2, 1)), resume=resume, **sft_overrides,
    )
    adapter = save_adapter(trainer, output_dir / "adapter")
    metrics["adapter"] = str(adapter)
    if merge and trainer.accelerator.is_main_process:
        if not base:
            raise ValueError("merge=True needs the base model's folder or repo id; pass model= as a path or repo id")
        metrics["merged"] = str(merge_adapter(adapter, output_dir / "merged", base=base))
    if trainer.accelerator.is_main_process:
        atomic_write_json(output_dir / "metrics.json", metrics)
    metrics["trainer"] = trainer
    return metrics


__all__ = ["load_user_dataset", "user_rows_to_tasks", "finetune_lora"]
