"""Evaluation of a trained UniCode MLLM on the Shapes world, each figure beside its chance level.

- VQA: greedy answers to every question of `test` images, accuracy overall and per question type,
  and the same on the `compositional` split (colour-shape pairs never seen in training). Chance is
  the prior-only baseline: per question type, always give the answer most frequent in the TRAIN
  split (a model that ignores the image can reach it, so only accuracy above it shows looking).
- Text-to-image: single-shape prompts (one caption per scene), generated with classifier-free
  guidance, read back by the scene parser (`scene_match` metric). Chance is the same metric on the
  rendered scenes of the prompts shuffled: a perfect painter that ignores the prompt. Ceiling is the
  same metric on the true scenes passed through the model's visual tokenizer (encode, decode): the
  best any LLM writing codes for this tokenizer can score.
- Reconstruction: PSNR of decode(encode(x)) on test images and codebook usage over their codes.

`evaluate_model` returns plain numbers (the report's `metrics`), the chance levels, and a few
examples (images, prompts, answers) for `samples.png`.
"""

from __future__ import annotations

from collections import Counter
from typing import Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from modeling_unicode.image_processing_unicode import UniCodeImageProcessor
from modeling_unicode.modeling_unicode import check_guidance_scale
from modeling_unicode.processing_unicode import check_vqa_layout, question_messages
from modeling_unicode.quantization_unicode import token_ids_to_code_indices

from .data.shapes import (
    TRAIN_PAIRS,
    build_split,
    caption_for_scene,
    example_rng,
    final_answer,
    questions_for_scene,
    render_scene,
    sample_scene,
    scene_from_json,
    scene_to_json,
)
from .metrics import load_metric
from .stage1 import images_to_uint8, to_pixel_values


def _device(model) -> torch.device:
    return next(model.parameters()).device


def vqa_prompt(processor, question: str, vqa_layout: Optional[str] = None, description: Optional[str] = None) -> str:
    """The prompt stage II trains VQA on (`templates.VQA[0]`: the question as asked), laid out as the model was
    trained: `vqa_layout`, by default the one its processor records (`question_messages`; `description`, the
    image's caption, for "describe_first")."""
    messages = question_messages(question, vqa_layout or processor.vqa_layout, description)
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _generate_text(model, processor, prompts: list[str], images, batch_size: int, max_new_tokens: int, desc: str):
    """Greedy continuations of (prompt, image) pairs, batched with left padding."""
    if len(images) != len(prompts):
        raise ValueError(f"images ({len(images)}) and prompts ({len(prompts)}) must pair up one to one")
    tokenizer = processor.tokenizer
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    texts: list[str] = []
    # VQA asks each image several questions, and encoding it again for every one was a large share of answering
    # them (docs/results.md, "A leaner tokenizer and a faster evaluation"): each image object is encoded once.
    codes_of: dict[int, torch.Tensor] = {}
    try:
        for start in tqdm(range(0, len(prompts), batch_size), desc=desc, leave=False):
            batch_images = list(images[start : start + batch_size])
            inputs = processor(
                text=prompts[start : start + batch_size], images=batch_images, return_tensors="pt", padding=True
            ).to(_device(model))
            pixel_values = inputs.pop("pixel_values")
            first: dict[int, int] = {}  # each image not yet encoded -> its first place in the batch
            for place, image in enumerate(batch_images):
                if id(image) not in codes_of:
                    first.setdefault(id(image), place)
            if first:
                encoded = model.model.encode_images(pixel_values[list(first.values())])
                codes_of.update(zip(first, encoded))
            image_codes = torch.stack([codes_of[id(image)] for image in batch_images])
            out = model.generate(**inputs, image_codes=image_codes, max_new_tokens=max_new_tokens, do_sample=False)
            texts += tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return [t.strip() for t in texts]


@torch.no_grad()
def describe_images(model, processor, images, batch_size: int = 16, max_new_tokens: int = 96) -> list[str]:
    """Greedy captions (`DESCRIBE_REQUEST`, also `templates.CAPTION[0]`), one per image: what a "describe_first"
    model answers from."""
    prompt = processor.description_prompt()
    return _generate_text(model, processor, [prompt] * len(images), images, batch_size, max_new_tokens, "captions")


# New tokens an answer may take: a one-word answer ends long before, and an answer written with its reasoning (a
# position's: every shape of the named colour with its cell, then the cell) fits (shapes.reasoned_answer).
ANSWER_TOKENS = 16


@torch.no_grad()
def answer_questions(
    model,
    processor,
    images,
    questions,
    batch_size: int = 16,
    max_new_tokens: int = ANSWER_TOKENS,
    desc: str = "VQA",
    vqa_layout: Optional[str] = None,
    groups: Optional[Sequence] = None,
) -> list[str]:
    """Greedy answers, one per (image, question) pair, asked in `vqa_layout` (default: the processor's, the layout
    the model was trained in). With "describe_first" the model first captions each distinct image (by identity)
    and answers after its own caption.

    `groups` (one key per question, e.g. its type): questions of one key are batched together, answers still come
    back in the questions' order. A batch generates until its longest reply ends, so one-word answers batched with
    replies that carry their reasoning would wait for them (docs/results.md, "Answers asked type by type")."""
    vqa_layout = vqa_layout or processor.vqa_layout
    check_vqa_layout(vqa_layout)
    if len(images) != len(questions):
        raise ValueError(f"images ({len(images)}) and questions ({len(questions)}) must pair up one to one")
    if groups is not None and len(groups) != len(questions):
        raise ValueError(f"groups ({len(groups)}) must give one key per question ({len(questions)})")
    descriptions = [None] * len(images)
    if vqa_layout == "describe_first":
        distinct = list({id(image): image for image in images}.values())
        written = dict(zip(map(id, distinct), describe_images(model, processor, distinct, batch_size)))
        descriptions = [written[id(image)] for image in images]
    prompts = [vqa_prompt(processor, q, vqa_layout, d) for q, d in zip(questions, descriptions)]
    if groups is None:
        return _generate_text(model, processor, prompts, images, batch_size, max_new_tokens, desc)
    order = sorted(range(len(prompts)), key=lambda i: str(groups[i]))  # stable: a group keeps its questions' order
    replies = _generate_text(
        model, processor, [prompts[i] for i in order], [images[i] for i in order], batch_size, max_new_tokens, desc
    )
    answers = [""] * len(prompts)
    for place, reply in zip(order, replies):
        answers[place] = reply
    return answers


def majority_answers(rows) -> dict[str, str]:
    """Per question type, the answer most frequent in `rows` (train-split rows with `questions`)."""
    counts: dict[str, Counter] = {}
    for row in rows:
        for qa in row["questions"]:
            counts.setdefault(qa["type"], Counter())[qa["answer"]] += 1
    return {kind: counter.most_common(1)[0][0] for kind, counter in counts.items()}


def evaluate_vqa(
    model,
    processor,
    dataset,
    prior: dict[str, str],
    batch_size: int = 16,
    desc: str = "VQA",
    swapped_images: bool = False,
    vqa_layout: Optional[str] = None,
) -> dict:
    """Accuracy (overall, per type) of the model and of the prior-only baseline on every question of
    `dataset`; also returns the (image, question, answer, prediction) tuples.

    `swapped_images`: also ask every question about ANOTHER scene's image (the next row's, cyclically),
    under `"swapped"`. A model that reads its image loses accuracy there; one that answers from the
    question alone scores the same, whatever its accuracy says.

    Rows with a `scene` (the Shapes world) are also scored on one-shape and on 2+-shape scenes apart, under
    `model_one_shape` / `model_multi_shape` (and their `chance_...`)."""

    images, questions, answers, kinds, scene_of = [], [], [], [], []
    rows = list(dataset)
    for index, row in enumerate(rows):
        for qa in row["questions"]:
            images.append(row["image"])
            questions.append(qa["question"])
            answers.append(qa["answer"])
            kinds.append(qa["type"])
            scene_of.append(index)
    ask = {"batch_size": batch_size, "vqa_layout": vqa_layout, "groups": kinds}
    predictions = answer_questions(model, processor, images, questions, desc=desc, **ask)
    # A reply may carry its reasoning before the answer ("left and right: yes"); the answer is what is scored.
    scored = [final_answer(p) for p in predictions]
    metric = load_metric("vqa_accuracy")
    model_scores = metric.compute(predictions=scored, references=answers, question_types=kinds)
    prior_predictions = [prior.get(k, "") for k in kinds]
    chance = metric.compute(predictions=prior_predictions, references=answers, question_types=kinds)
    examples = list(zip(images, questions, answers, predictions))
    out = {"model": model_scores, "chance": chance, "examples": examples}
    if rows and "scene" in rows[0]:
        # A lone shape needs no search for the object a question names; 2+ shapes need binding.
        shapes = [len(scene_from_json(rows[i]["scene"])["objects"]) for i in scene_of]
        for name, keep in (("one_shape", lambda n: n == 1), ("multi_shape", lambda n: n > 1)):
            picked = [i for i, n in enumerate(shapes) if keep(n)]
            if picked:
                take = lambda values: [values[i] for i in picked]  # noqa: E731
                out[f"model_{name}"] = metric.compute(
                    predictions=take(scored), references=take(answers), question_types=take(kinds)
                )
                out[f"chance_{name}"] = metric.compute(
                    predictions=take(prior_predictions), references=take(answers), question_types=take(kinds)
                )
    if swapped_images:
        if len(rows) < 2:
            raise ValueError(
                "swapped_images=True needs at least 2 scenes in the dataset (each question gets another scene's image)"
            )
        others = [rows[(i + 1) % len(rows)]["image"] for i in scene_of]
        swapped = answer_questions(model, processor, others, questions, desc=desc + ", swapped images", **ask)
        swapped = [final_answer(p) for p in swapped]
        out["swapped"] = metric.compute(predictions=swapped, references=answers, question_types=kinds)
    return out


def train_question_rows(num_scenes: int, seed: int = 0) -> list[dict]:
    """The questions of the first `num_scenes` train scenes, without rendering them: the same rng
    stream as `make_example`, so these are exactly the questions stage II trained on."""

    rows = []
    for i in range(num_scenes):
        rng = example_rng(seed, "train", i)
        scene = sample_scene(rng, 64, pairs=TRAIN_PAIRS)
        rows.append({"questions": questions_for_scene(scene, rng)})
    return rows


def single_shape_prompts(num_prompts: int, image_size: int, seed: int) -> list[tuple[str, str]]:
    """(caption, scene JSON) of `num_prompts` single-shape test scenes (colour-shape pairs of training)."""

    prompts = []
    for i in range(num_prompts):
        # A salt keeps these scenes apart from the test split's own (index-addressed) scenes.
        rng = example_rng(seed + 7919, "test", i)
        scene = sample_scene(rng, image_size, pairs=TRAIN_PAIRS, num_objects=1)
        prompts.append((caption_for_scene(scene), scene_to_json(scene)))
    return prompts


@torch.no_grad()
def generate_images(
    model,
    processor,
    captions: list[str],
    guidance_scale: Optional[float] = 3.0,
    batch_size: int = 8,
    seed: int = 0,
    do_sample: bool = False,
    desc: str = "text-to-image",
    return_codes: bool = False,
    **sampling,
):
    """PIL images for `captions` (image-mode generation with CFG; greedy unless `do_sample`; `sampling`,
    e.g. temperature / top_k, goes to `generate`). With `return_codes`, also the generated code ids,
    (num_captions, ĥ·ŵ·D)."""
    images, codes = [], []
    torch.manual_seed(seed)
    for start in tqdm(range(0, len(captions), batch_size), desc=desc, leave=False):
        chunk = captions[start : start + batch_size]
        inputs = processor(text=chunk, generation_mode="image").to(_device(model))
        sequences = model.generate(
            **inputs, generation_mode="image", guidance_scale=guidance_scale, do_sample=do_sample, **sampling
        )
        image_tokens = model.extract_image_tokens(sequences)
        codes.append(image_tokens.cpu())
        pixels = model.decode_image_tokens(image_tokens)
        images += processor.post_process_multimodal_output(pixels, generation_mode="image")
    return (images, torch.cat(codes)) if return_codes else images


def evaluate_generation(
    model,
    processor,
    num_prompts: int,
    guidance_scale: Optional[float] = 3.0,
    seed: int = 0,
    batch_size: int = 8,
    **sampling,
) -> dict:
    """Scene match of single-shape prompts drawn greedily, or sampled (seeded) when `sampling` holds
    `do_sample=True` and its settings (top_k, top_p, temperature)."""

    require_whole_number("generation_prompts", num_prompts, **LEAST_GENERATION_PROMPTS)
    image_size = model.config.vq_config.image_size
    prompts = single_shape_prompts(num_prompts, image_size, seed)
    captions = [c for c, _ in prompts]
    scenes = [s for _, s in prompts]
    generated = generate_images(
        model, processor, captions, guidance_scale, batch_size=batch_size, seed=seed, **sampling
    )
    metric = load_metric("scene_match")
    model_scores = metric.compute(predictions=generated, references=scenes)
    # Chance: the true rendering of a DIFFERENT prompt (a cyclic shift, so none keeps its own).
    rendered = [render_scene(s) for s in scenes]
    shifted = rendered[1:] + rendered[:1]
    chance = metric.compute(predictions=shifted, references=scenes)
    # Ceiling: the true rendering through the model's own visual tokenizer (encode, decode). A painter
    # that writes exactly the right codes scores this, so no stage-II training can beat it; below
    # the goal it says the visual tokenizer, not the LLM, is what stands in the way.
    ceiling = metric.compute(predictions=reconstruct_images(model, rendered)[0], references=scenes)
    return {"model": model_scores, "chance": chance, "ceiling": ceiling, "examples": list(zip(captions, generated))}


@torch.no_grad()
def reconstruct_images(model, images, batch_size: int = 32) -> tuple[list, list[torch.Tensor]]:
    """decode(encode(x)) through the MLLM's visual tokenizer: (PIL images, their code maps)."""

    vision = model.model._require_vision("reconstruction")
    codebook = model.model.codebook()
    postprocessor = UniCodeImageProcessor(size=vision.config.image_size)
    pixels = to_pixel_values(images_to_uint8(images, vision.config.image_size, "reconstruction images"))
    reconstructions, code_maps = [], []
    for start in range(0, len(images), batch_size):
        code_map = vision.encode(pixels[start : start + batch_size].to(_device(model)), codebook=codebook)
        reconstructions += postprocessor.postprocess(vision.decode(code_map, codebook=codebook))
        code_maps += list(code_map.cpu())
    return reconstructions, code_maps


def _codebook_usage(model, code_maps: list[torch.Tensor]) -> dict:
    """The `codebook_usage` metric (usage, perplexity) of code maps of vocabulary ids."""

    ids = model.model.codebook_token_ids.cpu()
    codes = [token_ids_to_code_indices(code_map.flatten(), ids).tolist() for code_map in code_maps]
    return load_metric("codebook_usage").compute(predictions=codes, codebook_size=len(ids))


def evaluate_reconstruction(model, images, batch_size: int = 32) -> dict:
    """PSNR of decode(encode(x)) through the MLLM's visual tokenizer, and codebook usage of the codes."""

    reconstructions, code_maps = reconstruct_images(model, images, batch_size)
    psnr = load_metric("psnr").compute(predictions=reconstructions, references=list(images))
    usage = _codebook_usage(model, code_maps)
    return {
        "psnr": psnr["psnr"],
        "usage": usage["usage"],
        "perplexity": usage["perplexity"],
        "reconstructions": reconstructions,
    }


@torch.no_grad()
def evaluate_codebook_usage(model, images, batch_size: int = 64) -> dict:
    """Codebook usage and perplexity of the codes of `images` (encode only, no decoding).

    Usage over n images is bounded by the code slots they hold that are not background: 64 tiny-preset
    Shapes scenes hold about 3,000 such slots, under 80 % of a K = 4,096 codebook even if every one used
    another code, so the usage goal is measured on many more images than PSNR needs."""

    vision = model.model._require_vision("codebook usage")
    codebook = model.model.codebook()
    images = list(images)
    code_maps = []
    for start in range(0, len(images), batch_size):
        pixels = to_pixel_values(
            images_to_uint8(images[start : start + batch_size], vision.config.image_size, "usage images")
        )
        code_maps += list(vision.encode(pixels.to(_device(model)), codebook=codebook).cpu())
    usage = _codebook_usage(model, code_maps)
    return {"usage": usage["usage"], "perplexity": usage["perplexity"], "num_images": len(code_maps)}


def _flat_scores(scores: dict, prefix: str = "") -> dict:
    return {
        f"{prefix}{k}": float(v)
        for k, v in scores.items()
        if isinstance(v, (int, float)) and not k.startswith("count_") and k not in ("num_examples", "num_images")
    }


def evaluate_model(
    model,
    processor,
    *,
    test,
    compositional,
    train_questions,
    generation_prompts: int = 24,
    guidance_scale: Optional[float] = 3.0,
    reconstruction_images: int = 64,
    usage_images=None,
    seed: int = 0,
    batch_size: int = 16,
) -> dict:
    """All demo metrics. `test` / `compositional`: Shapes splits at the model's image size;
    `train_questions`: train rows with `questions` (their answers make the prior-only VQA baseline);
    `usage_images`: the images codebook usage is measured on (default: the reconstruction images)."""
    model.eval()
    prior = majority_answers(train_questions)
    vqa = evaluate_vqa(model, processor, test, prior, batch_size=batch_size, desc="VQA (test)", swapped_images=True)
    comp = evaluate_vqa(model, processor, compositional, prior, batch_size=batch_size, desc="VQA (compositional)")
    generation = evaluate_generation(model, processor, generation_prompts, guidance_scale, seed=seed)
    recon_inputs = list(test["image"][:reconstruction_images])
    recon = evaluate_reconstruction(model, recon_inputs)
    # Without a usage sample the reconstruction's own codes are counted: no second encoding of the same images.
    usage = (
        evaluate_codebook_usage(model, usage_images)
        if usage_images is not None
        else {"usage": recon["usage"], "perplexity": recon["perplexity"], "num_images": len(recon_inputs)}
    )
    metrics = {
        "vqa": _flat_scores(vqa["model"]),
        "vqa_compositional": _flat_scores(comp["model"]),
        # The same questions about another scene's image: equal to `vqa` means the answers ignore the image.
        "vqa_swapped_images": _flat_scores(vqa["swapped"]),
        **{
            f"vqa_{name}": _flat_scores(vqa[f"model_{name}"])
            for name in ("one_shape", "multi_shape")
            if f"model_{name}" in vqa
        },
        "text_to_image": _flat_scores(generation["model"]),
        "reconstruction": {
            "psnr": recon["psnr"],
            "codebook_usage": usage["usage"],
            "codebook_perplexity": usage["perplexity"],
        },
    }
    chance = {
        "vqa": _flat_scores(vqa["chance"]),
        "vqa_compositional": _flat_scores(comp["chance"]),
        **{
            f"vqa_{name}": _flat_scores(vqa[f"chance_{name}"])
            for name in ("one_shape", "multi_shape")
            if f"chance_{name}" in vqa
        },
        "text_to_image": _flat_scores(generation["chance"]),
        "vqa_prior_answers": prior,
    }
    ceiling = {"text_to_image": _flat_scores(generation["ceiling"])}
    counts = {
        "vqa_questions": vqa["model"]["num_examples"],
        "vqa_compositional_questions": comp["model"]["num_examples"],
        "text_to_image_prompts": generation["model"]["num_images"],
        "reconstruction_images": len(recon_inputs),
        "usage_images": usage["num_images"],
    }
    examples = {
        "vqa": vqa["examples"],
        "generation": generation["examples"],
        "reconstruction": list(zip(recon_inputs, recon["reconstructions"])),
    }
    return {"metrics": metrics, "chance": chance, "ceiling": ceiling, "counts": counts, "examples": examples}


LEAST_GENERATION_PROMPTS = dict(least=2, why=" (the chance level shuffles the prompts among themselves)")


def require_whole_number(name: str, value, least: int = 1, why: str = "") -> None:
    """The one check of a count (scenes, prompts, steps): a whole number of at least `least`, else a ValueError
    that starts `name=value`, which the CLI turns into the flag the user typed."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name}={value!r} must be a whole number of at least {least}{why}")


def check_device(device: str) -> None:
    """`device` is "cpu", or "cuda" with a CUDA device present; checked before any model is loaded or trained."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r} is not supported; use 'cpu' or 'cuda'")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no CUDA device; drop --device cuda to run on CPU")


def check_evaluation_settings(guidance_scale: Optional[float] = None, **counts: int) -> None:
    """`evaluate_on_shapes`'s counts (scenes, prompts, images) and guidance scale, checked before any work."""

    for name, value in counts.items():
        require_whole_number(name, value, **(LEAST_GENERATION_PROMPTS if name == "generation_prompts" else {}))
    check_guidance_scale(guidance_scale)


def evaluate_on_shapes(
    model,
    processor,
    *,
    vqa_images: int = 100,
    compositional_images: int = 50,
    generation_prompts: int = 24,
    reconstruction_images: int = 64,
    usage_images: int = 1000,
    prior_scenes: int = 1000,
    guidance_scale: Optional[float] = 3.0,
    seed: int = 0,
    batch_size: int = 16,
) -> dict:
    """`evaluate_model` on Shapes world scenes generated at the model's own image size (defaults: the `tiny`
    demo's). VQA and reconstruction take the first test scenes, codebook usage `usage_images` of them;
    `prior_scenes` train scenes give the prior-only answers that the chance level is. The results carry
    these `settings` too."""

    counts = dict(
        vqa_images=vqa_images,
        compositional_images=compositional_images,
        generation_prompts=generation_prompts,
        reconstruction_images=reconstruction_images,
        usage_images=usage_images,
        prior_scenes=prior_scenes,
    )
    check_evaluation_settings(guidance_scale, **counts)
    size = model.config.vq_config.image_size
    scenes = build_split("test", max(vqa_images, usage_images), image_size=size, seed=seed)
    compositional = build_split("compositional", compositional_images, image_size=size, seed=seed)
    results = evaluate_model(
        model,
        processor,
        test=scenes.select(range(vqa_images)),
        compositional=compositional,
        usage_images=scenes["image"][:usage_images],
        train_questions=train_question_rows(prior_scenes, seed),
        generation_prompts=generation_prompts,
        guidance_scale=guidance_scale,
        reconstruction_images=min(reconstruction_images, vqa_images),
        seed=seed,
        batch_size=batch_size,
    )
    return {**results, "settings": {**counts, "guidance_scale": guidance_scale, "seed": seed}}


def metrics_markdown(results: dict) -> str:
    """The VQA, generation and reconstruction tables of `evaluate_model`'s results (or a report holding
    its `metrics`, `chance`, `ceiling` and `counts`)."""
    m, c = results["metrics"], results["chance"]
    lines = [
        "## Understanding (VQA, Shapes world test split)",
        "",
        "| question type | accuracy | chance (prior-only answer) | asked about another scene's image |",
        "|---|---|---|---|",
    ]
    swapped = m.get("vqa_swapped_images", {})
    for key in sorted(m["vqa"]):
        if key.startswith("accuracy"):
            label = key.replace("accuracy_", "") if key != "accuracy" else "**overall**"
            lines.append(
                f"| {label} | {m['vqa'][key]:.3f} | {c['vqa'].get(key, float('nan')):.3f} | "
                f"{swapped.get(key, float('nan')):.3f} |"
            )
    for name, label in (("vqa_one_shape", "one-shape scenes"), ("vqa_multi_shape", "scenes of 2+ shapes")):
        if name in m:
            lines.append(
                f"| {label} | {m[name]['accuracy']:.3f} | {c.get(name, {}).get('accuracy', float('nan')):.3f} | |"
            )
    lines.append(
        f"| compositional split (held-out colour-shape pairs) | {m['vqa_compositional']['accuracy']:.3f} | "
        f"{c['vqa_compositional']['accuracy']:.3f} | |"
    )
    lines += [
        "",
        "The last column asks every question about the next test scene's image: where it equals the accuracy, "
        "the answers come from the question alone, not from the image.",
    ]
    ceiling = results["ceiling"]["text_to_image"]
    lines += [
        "",
        "## Generation (text-to-image, single-shape prompts, scene parser)",
        "",
        "| attribute | model | chance (true image of another prompt) | ceiling (true image through the visual "
        "tokenizer) |",
        "|---|---|---|---|",
    ]
    for key in ("all_correct", "color", "shape", "size", "position", "count", "unparseable"):
        lines.append(f"| {key} | {m['text_to_image'][key]:.3f} | {c['text_to_image'][key]:.3f} | {ceiling[key]:.3f} |")
    r = m["reconstruction"]
    lines += [
        "",
        "## Reconstruction (visual tokenizer, test split)",
        "",
        f"PSNR {r['psnr']:.2f} dB on {results['counts']['reconstruction_images']} images; codebook usage "
        f"{r['codebook_usage']:.3f} (perplexity {r['codebook_perplexity']:.1f}) on "
        f"{results['counts']['usage_images']} images.",
    ]
    return "\n".join(lines)


def above_chance(metrics: dict, chance: dict, section: str = "vqa", margin: float = 0.0) -> dict[str, bool]:
    """Per key of `metrics[section]` (accuracy / accuracy_<type>): strictly above its chance level, or with a
    `margin`, at least that much above it."""
    if margin:
        return {
            k: bool(v >= chance[section].get(k, np.inf) + margin)
            for k, v in metrics[section].items()
            if k.startswith("accuracy")
        }
    return {
        k: bool(v > chance[section].get(k, np.inf)) for k, v in metrics[section].items() if k.startswith("accuracy")
    }


__all__ = [
    "vqa_prompt",
    "answer_questions",
    "majority_answers",
    "evaluate_vqa",
    "train_question_rows",
    "single_shape_prompts",
    "generate_images",
    "evaluate_generation",
    "reconstruct_images",
    "evaluate_reconstruction",
    "evaluate_codebook_usage",
    "evaluate_model",
    "require_whole_number",
    "check_device",
    "check_evaluation_settings",
    "evaluate_on_shapes",
    "metrics_markdown",
    "above_chance",
]
