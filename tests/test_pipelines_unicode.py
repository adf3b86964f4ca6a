"""The three pipelines: transformers' image-text-to-text and any-to-any, and the diffusers
text-to-image pipeline (saved and reloaded)."""

import importlib.util

import pytest
import torch
from transformers import pipeline
from utils_mllm import random_images, tiny_mllm

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None
HAS_DIFFUSERS = importlib.util.find_spec("diffusers") is not None


def test_image_text_to_text_pipeline_answers_about_an_image():
    model, processor = tiny_mllm("rq")
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    image = processor.postprocess(random_images(1))[0]
    out = pipe(
        images=image, text="USER: <image> what color is the circle? ASSISTANT:", max_new_tokens=4, do_sample=False
    )
    assert isinstance(out[0]["generated_text"], str)
    chat = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": " what shape?"}]}]
    out = pipe(text=chat, max_new_tokens=3, do_sample=False)
    assert out[0]["generated_text"][-1]["role"] == "assistant"


@pytest.mark.skipif(
    not HAS_TORCHVISION, reason="transformers' any-to-any pipeline requires torchvision, which does not import here"
)
def test_any_to_any_pipeline_generates_text_and_images():
    model, processor = tiny_mllm("rq")
    pipe = pipeline("any-to-any", model=model, processor=processor)
    image = pipe(
        "a red circle", generation_mode="image", processor_kwargs={"generation_mode": "image"}, guidance_scale=3.0
    )
    assert image[0]["generated_image"].size == (16, 16)
    text = pipe(text="USER: what color? ASSISTANT:", max_new_tokens=3)
    assert isinstance(text[0]["generated_text"], str)


def test_the_calls_any_to_any_makes_for_an_image():
    """What `AnyToAnyPipeline` does in image mode — processor(text), model.generate, decode_image_tokens,
    post_process_multimodal_output — checked directly, since the pipeline needs torchvision."""
    model, processor = tiny_mllm("hq")
    inputs = processor(text="a red circle", return_tensors="pt")  # the pipeline's plain call
    sequences = model.generate(**inputs, generation_mode="image", max_new_tokens=256)
    pixels = model.decode_image_tokens(sequences.to(model.device))
    images = processor.post_process_multimodal_output(pixels, skip_special_tokens=True, generation_mode="image")
    assert len(images) == 1 and images[0].size == (16, 16)
    with_cfg = processor(text="a red circle", generation_mode="image")  # processor_kwargs={"generation_mode": "image"}
    sequences = model.generate(**with_cfg, generation_mode="image", guidance_scale=3.0)
    assert processor.post_process_multimodal_output(model.decode_image_tokens(sequences), generation_mode="image")[
        0
    ].size == (16, 16)


def test_any_to_any_pipeline_runs_when_its_torchvision_check_is_lifted(monkeypatch):
    """The torchvision requirement is the pipeline's (for image inputs it loads); a caption-only call does
    not touch torchvision, so with the check lifted the real pipeline code runs end to end."""
    import transformers.pipelines.any_to_any as any_to_any

    monkeypatch.setattr(any_to_any, "requires_backends", lambda *args, **kwargs: None)
    model, processor = tiny_mllm("vq")
    pipe = pipeline("any-to-any", model=model, processor=processor)
    out = pipe(
        "a red circle",
        generation_mode="image",
        processor_kwargs={"generation_mode": "image"},
        guidance_scale=3.0,
        do_sample=False,
    )
    assert out[0]["generated_image"].size == (16, 16)
    text = pipe(text="USER: what color is the circle? ASSISTANT:", max_new_tokens=3, do_sample=False)
    assert isinstance(text[0]["generated_text"], str)


@pytest.mark.skipif(not HAS_DIFFUSERS, reason="diffusers is not installed (pip install unicode-mllm[diffusers])")
def test_diffusers_text_to_image_pipeline_generates_saves_and_reloads(tmp_path):
    from modeling_unicode.pipeline_unicode_diffusers import UniCodeTextToImagePipeline

    model, processor = tiny_mllm("rq")
    pipe = UniCodeTextToImagePipeline(model=model, processor=processor)
    first = pipe("a red circle", guidance_scale=3.0, generator=torch.Generator().manual_seed(0))
    again = pipe("a red circle", guidance_scale=3.0, generator=torch.Generator().manual_seed(0))
    assert first.images[0].size == (16, 16) and torch.equal(first.image_token_ids, again.image_token_ids)
    assert first.image_token_ids.shape == (1, 32)

    pipe.save_pretrained(tmp_path)
    reloaded = UniCodeTextToImagePipeline.from_pretrained(tmp_path)
    assert type(reloaded.model) is type(model)
    out = reloaded("a red circle", guidance_scale=3.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.image_token_ids, first.image_token_ids)
    arrays = reloaded(
        ["a red circle", "a blue square"], num_images_per_prompt=2, output_type="np", do_sample=False
    ).images
    assert arrays.shape == (4, 16, 16, 3) and arrays.min() >= 0 and arrays.max() <= 1
    with pytest.raises(ValueError, match="output_type='latent'"):
        reloaded("a red circle", output_type="latent")
