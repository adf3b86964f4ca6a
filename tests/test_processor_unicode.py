"""UniCodeImageProcessor (modes, resizing, bombs, corrupt bytes) and UniCodeProcessor (chat template,
placeholder expansion, text-to-image prompts, post-processing, Auto* loading)."""

import io

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import AutoImageProcessor, AutoProcessor
from utils_mllm import tiny_mllm, tiny_tokenizer

from modeling_unicode import IMAGE_TOKEN, UniCodeImageProcessor, UniCodeProcessor


def png_bytes(image: PIL.Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "mode,value,expected_rgb",
    [
        ("L", 255, (255, 255, 255)),
        ("1", 1, (255, 255, 255)),
        ("LA", (0, 0), (255, 255, 255)),  # fully transparent black -> the white background
        ("RGBA", (255, 0, 0, 255), (255, 0, 0)),
        ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
        ("I;16", 65535, (255, 255, 255)),  # 16-bit white stays white (PIL's convert would clip)
        ("I;16", 32896, (128, 128, 128)),
        ("I", 65535, (255, 255, 255)),
    ],
)
def test_every_common_mode_becomes_rgb_in_minus_one_to_one(mode, value, expected_rgb):
    processor = UniCodeImageProcessor(size=8)
    pixels = processor(PIL.Image.new(mode, (5, 7), value))["pixel_values"]
    assert pixels.shape == (1, 3, 8, 8) and pixels.dtype == torch.float32
    expected = torch.tensor(expected_rgb, dtype=torch.float32) / 127.5 - 1
    torch.testing.assert_close(pixels[0, :, 3, 3], expected, atol=1 / 127.5, rtol=0)


def test_palette_images_with_transparency_and_numpy_and_bytes_inputs():
    processor = UniCodeImageProcessor(size=4)
    palette = PIL.Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0] * 256)
    palette.info["transparency"] = 0
    assert torch.allclose(processor(palette)["pixel_values"], torch.ones(1, 3, 4, 4))  # transparent -> white
    array = np.zeros((4, 4, 3), dtype=np.uint8)
    array[..., 2] = 255
    from_array = processor([array, png_bytes(PIL.Image.fromarray(array))])["pixel_values"]
    assert torch.equal(from_array[0], from_array[1]) and from_array[0, 2].min() == 1.0


def test_squash_keeps_the_whole_image_and_center_crop_cuts_the_sides():
    wide = np.zeros((8, 32, 3), dtype=np.uint8)
    wide[:, :4] = 255  # a white stripe at the left edge
    squash = UniCodeImageProcessor(size=8, resize_mode="squash", resample="nearest")(wide)["pixel_values"]
    crop = UniCodeImageProcessor(size=8, resize_mode="center_crop", resample="nearest")(wide)["pixel_values"]
    assert squash[0, :, :, 0].min() == 1.0  # the stripe survives squashing
    assert crop.max() == -1.0  # and is cropped away


def test_bombs_corrupt_bytes_and_unsupported_inputs_raise_clear_errors():
    processor = UniCodeImageProcessor(size=8, max_image_pixels=100)
    with pytest.raises(ValueError, match="decompression-bomb guard"):
        processor(PIL.Image.new("RGB", (20, 20)))
    with pytest.raises(ValueError, match="decompression-bomb guard"):
        processor(png_bytes(PIL.Image.new("RGB", (20, 20))))
    good = UniCodeImageProcessor(size=8)
    with pytest.raises(ValueError, match="could not be decoded"):
        good(b"definitely not an image")
    with pytest.raises(ValueError, match="could not be decoded"):
        good(png_bytes(PIL.Image.new("RGB", (64, 64), (1, 2, 3)))[:60])  # truncated file
    with pytest.raises(ValueError, match="mode 'F'"):
        good(PIL.Image.new("F", (4, 4)))
    with pytest.raises(ValueError, match="uint8"):
        good(np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="at least one pixel"):
        good(np.zeros((0, 4, 3), dtype=np.uint8))
    with pytest.raises(TypeError, match="pass PIL images"):
        good(42)
    with pytest.raises(ValueError, match="resize_mode='stretch'"):
        UniCodeImageProcessor(resize_mode="stretch")
    with pytest.raises(ValueError, match="must be square"):
        UniCodeImageProcessor(size={"height": 8, "width": 16})


def test_postprocess_inverts_preprocess():
    processor = UniCodeImageProcessor(size=8)
    array = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    image = processor.postprocess(processor(array)["pixel_values"])[0]
    assert np.array_equal(np.asarray(image), array)


def test_chat_template_renders_image_content_and_expands_placeholders():
    model, processor = tiny_mllm("rq")
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " what color is the circle?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
        {"role": "user", "content": "and the square?"},
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert (
        prompt
        == f"USER: {IMAGE_TOKEN} what color is the circle?\nASSISTANT: red</s>\nUSER: and the square?\nASSISTANT:"
    )
    image = processor.postprocess(torch.zeros(1, 3, 16, 16))
    inputs = processor(text=prompt, images=image)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 16
    assert inputs["pixel_values"].shape == (1, 3, 16, 16)
    tokenized = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image", "image": image[0]}, {"type": "text", "text": " describe"}]}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
    )
    assert int((tokenized["input_ids"] == model.config.image_token_id).sum()) == 16 and "pixel_values" in tokenized


def test_batches_pad_on_the_left_and_image_count_must_match_the_text():
    _, processor = tiny_mllm("rq")
    images = processor.postprocess(torch.zeros(2, 3, 16, 16))
    batch = processor(
        text=["USER: <image> hi ASSISTANT:", "USER: <image> what is the big red circle? ASSISTANT:"], images=images
    )
    assert (batch["attention_mask"][:, -1] == 1).all() and batch["attention_mask"][0, 0] == 0
    with pytest.raises(ValueError, match="should be the same as the number of images"):
        processor(text="USER: <image> <image> hi", images=images[:1])
    with pytest.raises(ValueError, match="no images were passed"):
        processor(text="USER: <image> hi")


def test_question_prompt_is_the_image_a_newline_and_the_question():
    _, processor = tiny_mllm("rq")
    assert processor.question_prompt("what color?") == "USER: <image>\nwhat color?\nASSISTANT:"
    with pytest.raises(TypeError, match="question must be a string, got int"):
        processor.question_prompt(3)


def test_question_prompt_follows_the_layout_the_model_was_trained_in_and_the_layout_is_saved(tmp_path):
    model, processor = tiny_mllm("rq")
    processor.vqa_layout = "question_first"
    assert processor.question_prompt("what color?") == "USER: what color?\n<image>\nASSISTANT:"
    processor.vqa_layout = "describe_first"
    with pytest.raises(ValueError, match="describe_first layout needs the image's caption.*description_prompt"):
        processor.question_prompt("what color?")
    assert processor.description_prompt() == "USER: <image>\nDescribe this image.\nASSISTANT:"
    eos = processor.tokenizer.eos_token
    assert processor.question_prompt("what color?", description="a red circle") == (
        f"USER: <image>\nDescribe this image.\nASSISTANT: a red circle{eos}\nUSER: what color?\nASSISTANT:"
    )
    model.config.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert AutoProcessor.from_pretrained(tmp_path).vqa_layout == "describe_first"
    with pytest.raises(ValueError, match="vqa_layout='caption_first' is not a VQA layout.*describe_first"):
        UniCodeProcessor(
            image_processor=processor.image_processor, tokenizer=processor.tokenizer, vqa_layout="caption_first"
        )


def test_image_generation_prompts_come_with_the_empty_caption_unconditional_prompt():
    _, processor = tiny_mllm("rq")
    inputs = processor(text=["a red circle", "a big blue square"], generation_mode="image")
    assert set(inputs) == {"input_ids", "attention_mask", "unconditional_input_ids", "unconditional_attention_mask"}
    decode = processor.tokenizer.decode
    assert decode(inputs["input_ids"][0], skip_special_tokens=True).startswith("user : generate an image")
    empty = processor.image_generation_prompt("")
    assert empty == "USER: Generate an image based on this description: ''.\nASSISTANT:"
    assert inputs["unconditional_input_ids"][0].tolist() == processor.tokenizer(empty).input_ids
    with pytest.raises(ValueError, match="captions only"):
        processor(
            text="a red circle", images=processor.postprocess(torch.zeros(1, 3, 16, 16)), generation_mode="image"
        )
    with pytest.raises(ValueError, match="must not contain <image>"):
        processor(text="a <image> circle", generation_mode="image")


def test_post_process_multimodal_output_gives_text_or_images():
    _, processor = tiny_mllm("rq")
    ids = processor.tokenizer(["a red circle"], return_tensors="pt").input_ids
    assert processor.post_process_multimodal_output(ids) == ["a red circle"]
    images = processor.post_process_multimodal_output(torch.zeros(2, 3, 16, 16), generation_mode="image")
    assert len(images) == 2 and images[0].size == (16, 16)
    with pytest.raises(TypeError, match="decode_image_tokens"):
        processor.post_process_multimodal_output(ids, generation_mode="image")


def test_processor_refuses_a_tokenizer_without_image_tokens_or_a_mismatched_image_size():
    with pytest.raises(ValueError, match="add_image_special_tokens"):
        UniCodeProcessor(image_processor=UniCodeImageProcessor(size=16), tokenizer=tiny_tokenizer())
    model, processor = tiny_mllm("rq")
    with pytest.raises(ValueError, match="UniCodeImageProcessor\\(size=16\\)"):
        UniCodeProcessor.from_model_config(model.config, processor.tokenizer, UniCodeImageProcessor(size=32))


def test_auto_image_processor_and_processor_load_from_a_model_folder(tmp_path):
    model, processor = tiny_mllm("rq")
    model.config.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    image_processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert isinstance(image_processor, UniCodeImageProcessor) and image_processor.size == 16
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, UniCodeProcessor) and loaded.tokenizer.image_token_id == model.config.image_token_id
    assert loaded.image_generation_prompt("x") == processor.image_generation_prompt("x")
