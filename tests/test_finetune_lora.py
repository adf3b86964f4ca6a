"""A user's LoRA fine-tune (`unicode-mllm finetune` / examples/finetune_lora.py) on a 200-example
dataset in the documented schema changes the model's answers."""

import json

import datasets
import pytest
import torch
from PIL import Image
from utils_mllm import tiny_mllm

from training.finetune import finetune_lora
from training.sft import load_unicode_model

COLOURS = {"red": (230, 30, 30), "blue": (30, 30, 230)}


def user_dataset(n=200):
    rows = []
    for i in range(n):
        name = list(COLOURS)[i % 2]
        image = Image.new("RGB", (16, 16), COLOURS[name])
        if i % 5 == 4:  # text-to-image rows: image + caption, no conversation
            rows.append({"image": image, "messages": None, "caption": f"a {name} picture"})
            continue
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is this?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": name}]},
        ]
        rows.append({"image": image, "messages": messages, "caption": None})
    return datasets.Dataset.from_list(rows).cast_column("image", datasets.Image())


def answer(model, processor, colour):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is this?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=prompt, images=[Image.new("RGB", (16, 16), COLOURS[colour])])
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def test_lora_finetune_on_a_user_dataset_changes_the_answers(tmp_path):
    model, processor = tiny_mllm()
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    user_dataset().save_to_disk(str(tmp_path / "data"))
    before = {c: answer(model, processor, c) for c in COLOURS}

    metrics = finetune_lora(
        str(tmp_path / "model"),
        str(tmp_path / "data"),
        tmp_path / "out",
        max_steps=60,
        batch_size=8,
        learning_rate=1e-2,
        lora_r=8,
        merge=True,
    )
    assert metrics["global_step"] == 60 and (tmp_path / "out" / "adapter" / "adapter_config.json").is_file()
    merged = load_unicode_model(tmp_path / "out" / "merged").eval()
    after = {c: answer(merged, processor, c) for c in COLOURS}
    assert after != before
    assert after == {"red": "red", "blue": "blue"}, after


def test_finetune_refuses_a_dataset_without_the_schema(tmp_path):
    model, processor = tiny_mllm()
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    no_image = datasets.Dataset.from_list([{"caption": "a red picture"}])
    with pytest.raises(ValueError, match="no 'image' column"):
        finetune_lora(str(tmp_path / "model"), no_image, tmp_path / "out", max_steps=1)
    no_task = datasets.Dataset.from_list([{"image": Image.new("RGB", (16, 16))}]).cast_column(
        "image", datasets.Image()
    )
    with pytest.raises(ValueError, match="'messages'.*'caption'"):
        finetune_lora(str(tmp_path / "model"), no_task, tmp_path / "out", max_steps=1)


def test_a_stopped_finetune_resumes_from_its_last_complete_checkpoint(tmp_path):
    from training.cli import main
    from training.run_guard import OutputFolderError, ResumeSettingsError

    model, processor = tiny_mllm()
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    user_dataset(40).save_to_disk(str(tmp_path / "data"))
    common = [
        "finetune",
        "--model",
        str(tmp_path / "model"),
        "--dataset",
        str(tmp_path / "data"),
        "--output",
        str(tmp_path / "out"),
        "--batch-size",
        "4",
    ]
    assert main([*common, "--steps", "4"]) == 0  # checkpoints every 2 steps: the run "stopped" at step 4
    partial = tmp_path / "out" / "trainer" / "checkpoint-6"
    partial.mkdir()  # what a kill during a save leaves: no COMPLETE marker
    with pytest.raises(OutputFolderError, match="--resume to continue it"):  # a re-run must say what it wants
        main([*common, "--steps", "6"])
    with pytest.raises(ResumeSettingsError, match="learning_rate: 0.0002 -> 0.001"):
        main([*common, "--steps", "6", "--resume", "--lr", "1e-3"])
    assert main([*common, "--steps", "6", "--resume"]) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert (
        metrics["resumed_from"] == str(tmp_path / "out" / "trainer" / "checkpoint-4") and metrics["global_step"] == 6
    )
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").is_file()
