"""The model card of an exported UniCode model, written from the run's `report.json`.

Every number on the card is read from the report (metrics, settings, wall times, versions): nothing
is typed by hand, so the card cannot drift from what the run measured.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from huggingface_hub import ModelCard, ModelCardData

# Licences of the LLMs our presets start from. The exported weights derive from the base LLM, so the
# card states its licence next to the code's Apache-2.0.
KNOWN_BASE_LICENSES = {
    "lmsys/vicuna-7b-v1.5": "llama2 (Llama 2 Community License)",
    "lmsys/vicuna-13b-v1.5": "llama2 (Llama 2 Community License)",
    "google/gemma-3-270m": "gemma (Gemma Terms of Use)",
    "google/gemma-3-270m-it": "gemma (Gemma Terms of Use)",
}
TAGS = ["unicode", "multimodal", "image-generation", "visual-tokenizer", "unified-codebook", "custom_code"]
PAPER = "https://arxiv.org/abs/2403.09072"


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts to `{"a/b": leaf}` in their own order."""
    if not isinstance(tree, dict):
        return {prefix: tree} if prefix else {}
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        flat.update(flatten(value, name) if isinstance(value, dict) else {name: value})
    return flat


def _number(value: Any) -> Optional[str]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, int):
        return str(value)
    return "nan" if math.isnan(value) else f"{value:.4g}"


def metric_rows(report: dict) -> list[tuple[str, str]]:
    """(name, formatted value) of every numeric metric in the report, in the report's order."""
    return [(name, text) for name, value in flatten(report.get("metrics", {})).items() if (text := _number(value)) is not None]


def base_model_of(report: dict) -> Optional[str]:
    """The base LLM the run started from, as the report's settings name it (None: trained in stage 0)."""
    settings = report.get("settings", {}) or {}
    for key in ("base_model", "llm", "llm_path"):
        value = settings.get(key)
        if isinstance(value, str) and value:
            return value
    text_model = settings.get("text_model")
    if isinstance(text_model, dict) and text_model.get("source") != "stage0":
        return text_model.get("name_or_path")
    return None


def _is_repo_id(name: Optional[str]) -> bool:
    # Local paths (outputs/tiny/text_lm, /abs/x.gguf) must not become `base_model` metadata.
    return bool(name) and name.count("/") == 1 and not name.startswith((".", "/")) and not name.endswith(".gguf")


def _table(rows: list[tuple[str, str]], header: tuple[str, str]) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| `{name}` | {value} |" for name, value in rows]
    return "\n".join(lines)


def _scalar_rows(tree: Any) -> list[tuple[str, str]]:
    rows = []
    for name, value in flatten(tree).items():
        if isinstance(value, (list, tuple)):
            value = ", ".join(map(str, value))
        rows.append((name, _number(value) or f"`{value}`" if value is not None else "–"))
    return rows


def build_model_card(
    report: dict,
    *,
    repo_id: Optional[str] = None,
    base_model: Optional[str] = None,
    base_model_license: Optional[str] = None,
    samples_file: Optional[str] = "samples.png",
    quantizer: Optional[str] = None,
    image_size: Optional[int] = None,
    tokens_per_image: Optional[int] = None,
) -> ModelCard:
    """The card for an exported UniCode model.

    Args:
        report (`dict`): the run's `report.json` (`metrics`, and optionally `settings`, `wall_times`,
            `versions`, `datasets`).
        repo_id (`str`, *optional*): where it will live; the usage snippets load it from there.
        base_model (`str`, *optional*): the base LLM; default: the one the report's settings name.
        base_model_license (`str`, *optional*): its licence; default: looked up for known LLMs.
        samples_file (`str`, *optional*): the sample grid, relative to the card.
        quantizer, image_size, tokens_per_image: from the model's config, for the description.
    """
    if not isinstance(report, dict) or not metric_rows(report):
        raise ValueError("report must be a run's report.json with numeric values under 'metrics'; evaluate the run first")
    base_model = base_model or base_model_of(report)
    license_text = base_model_license or KNOWN_BASE_LICENSES.get(base_model or "")
    datasets = report.get("datasets") or (report.get("settings", {}) or {}).get("datasets")
    datasets = [d for d in ([datasets] if isinstance(datasets, str) else datasets or []) if _is_repo_id(d)]
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        license="apache-2.0",
        base_model=base_model if _is_repo_id(base_model) else None,
        datasets=datasets or None,
        tags=TAGS,
    )
    name = repo_id or "path/to/exported-model"
    if base_model is None:
        base_text = "a small Llama trained from scratch in stage 0 of this run (no third-party weights)"
    else:
        base_text = f"`{base_model}`" + (f", licence: {license_text}" if license_text else ", licence: see the base model's card")
    shape = ""
    if quantizer and image_size and tokens_per_image:
        shape = (f" This checkpoint reads and writes {image_size}×{image_size} images as {tokens_per_image} vocabulary ids "
                 f"(`{quantizer}` stacked code map).")
    sections = [
        f"# UniCode — {name.split('/')[-1]}",
        "A multimodal LLM with **one codebook for text and images**, after *UniCode: Learning a Unified Codebook "
        f"for Multimodal LLMs* ([arXiv 2403.09072]({PAPER})). The visual tokenizer quantizes an image into rows of the "
        "LLM's own input-embedding table, so an image is a sequence of ordinary vocabulary ids that the LLM reads "
        "(understanding) and writes (generation), and the tokenizer's decoder turns ids back into pixels." + shape,
        f"- **Base LLM**: {base_text}.\n- **Code licence**: Apache-2.0 (the `*.py` files of this repository).\n"
        "- **Visual tokenizer alone**: the `vision_tokenizer/` subfolder (`AutoModel.from_pretrained(repo, "
        "subfolder=\"vision_tokenizer\", trust_remote_code=True)`).",
        "## Usage\n\nThe model code ships with the weights: pass `trust_remote_code=True`.\n\n"
        "Ask about an image:\n\n```python\nfrom PIL import Image\n"
        "from transformers import AutoModelForImageTextToText, AutoProcessor\n\n"
        f"model = AutoModelForImageTextToText.from_pretrained(\"{name}\", trust_remote_code=True)\n"
        f"processor = AutoProcessor.from_pretrained(\"{name}\", trust_remote_code=True)\n"
        "messages = [{\"role\": \"user\", \"content\": [{\"type\": \"image\"}, {\"type\": \"text\", \"text\": \"What is in the picture?\"}]}]\n"
        "prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)\n"
        "inputs = processor(images=[Image.open(\"picture.png\")], text=prompt)\n"
        "ids = model.generate(**inputs, max_new_tokens=32)\n"
        "print(processor.batch_decode(ids[:, inputs[\"input_ids\"].shape[1]:], skip_special_tokens=True)[0])\n```\n\n"
        "Generate an image (classifier-free guidance batched into one forward per step):\n\n```python\n"
        "inputs = processor(text=\"a red circle left of a blue square\", generation_mode=\"image\")\n"
        "ids = model.generate(**inputs, generation_mode=\"image\", guidance_scale=3.0, do_sample=True)\n"
        "image = processor.post_process_multimodal_output(model.decode_image_tokens(ids), generation_mode=\"image\")[0]\n"
        "image.save(\"generated.png\")\n```",
        "## Evaluation\n\nMeasured by the training run and copied from its `report.json` (shipped in this repository):\n\n"
        + _table(metric_rows(report), ("metric", "value")),
    ]
    if samples_file:
        sections.append(f"## Samples\n\n![Samples from the training run]({samples_file})")
    recipe = ["## Training recipe",
              "Stage I trains the visual tokenizer with the language-driven iterative codebook (the codebook follows the "
              "LLM's embedding rows and ends equal to them); stage II teaches the LLM to read and write the codes "
              "(image-decompression pre-training, then instruction tuning on understanding and generation, LoRA on the "
              "LLM with the embeddings frozen so the codebook stays unified)."]
    if report.get("settings"):
        recipe.append("Settings of this run:\n\n" + _table(_scalar_rows(report["settings"]), ("setting", "value")))
    if report.get("wall_times"):
        recipe.append("Wall times (seconds):\n\n" + _table(_scalar_rows(report["wall_times"]), ("stage", "seconds")))
    if report.get("versions"):
        recipe.append("Software:\n\n" + _table(_scalar_rows(report["versions"]), ("package", "version")))
    sections.append("\n\n".join(recipe))
    sections.append(
        "## Limitations\n\n- The codebook is capped by the LLM vocabulary, and images are read and written at one "
        "fixed resolution (the visual tokenizer's); other sizes are resized by the processor.\n"
        "- Images only (no video or audio). Visual question answering lags CLIP-based MLLMs such as LLaVA-1.5, as in "
        "the paper.\n- Small presets are trained on the synthetic Shapes world: they describe and draw coloured "
        "shapes, not natural photographs.\n- Generated images can be wrong about counts, colours and positions; do "
        "not use them as evidence of anything."
    )
    sections.append(
        "## Citation\n\n```bibtex\n@inproceedings{zheng2024unicode,\n  title={UniCode: Learning a Unified Codebook "
        "for Multimodal Large Language Models},\n  author={Zheng, Sipeng and Zhou, Bohan and Feng, Yicheng and "
        "Wang, Ye and Lu, Zongqing},\n  booktitle={ECCV},\n  year={2024}\n}\n```"
    )
    content = f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n"
    return ModelCard(content)


__all__ = ["build_model_card", "metric_rows", "base_model_of", "flatten", "KNOWN_BASE_LICENSES"]
