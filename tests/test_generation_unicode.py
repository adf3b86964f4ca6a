"""Generation with the UniCode MLLM: text with/without KV cache, span-constrained image generation for
vq/rq/hq, batched classifier-free guidance against a two-pass reference, and clear errors."""

import pytest
import torch
from utils_mllm import random_images, tiny_mllm

from modeling_unicode import UniCodeImageSpanLogitsProcessor

PROMPT = "USER: <image> what color is the circle? ASSISTANT:"


def image_span(model, sequences):
    """(codes, the ids right before and after them) of each generated row."""
    n = model.config.image_tokens_per_generation
    return sequences[:, -n - 1 : -1], sequences[:, -n - 2], sequences[:, -1]


def test_text_generation_with_and_without_kv_cache_is_identical():
    model, processor = tiny_mllm("rq")
    inputs = processor(
        text=[PROMPT, "USER: <image> describe the picture ASSISTANT:"], images=processor.postprocess(random_images(2))
    )
    cached = model.generate(**inputs, max_new_tokens=8, do_sample=False, use_cache=True)
    uncached = model.generate(**inputs, max_new_tokens=8, do_sample=False, use_cache=False)
    assert cached.shape == (2, inputs["input_ids"].shape[1] + 8)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize(
    "decoding", [dict(do_sample=False), dict(num_beams=2, num_return_sequences=2), dict(do_sample=True)]
)
def test_text_generation_never_writes_the_image_placeholder(decoding):
    # <image> only stands for an input image's features. A model that would write it (here: its LM head's <image>
    # logit raised so it wins every step) must not, or the next step feeds the placeholder back without pixels and
    # fails (beam search of the random tiny model did, at its second step).
    model, processor = tiny_mllm("rq")
    image_token = model.config.image_token_id

    def prefer_the_placeholder(module, args, logits):
        logits = logits.clone()
        logits[..., image_token] += 1e4
        return logits

    model.lm_head.register_forward_hook(prefer_the_placeholder)
    inputs = processor(
        text=[PROMPT, "USER: <image> describe the picture ASSISTANT:"], images=processor.postprocess(random_images(2))
    )
    prompt_length = inputs["input_ids"].shape[1]
    torch.manual_seed(0)
    sequences = model.generate(**inputs, max_new_tokens=6, **decoding)
    assert sequences.shape[1] == prompt_length + 6
    assert not bool((sequences[:, prompt_length:] == image_token).any())


def test_text_generation_reads_precomputed_image_codes_like_pixels():
    model, processor = tiny_mllm("hq")
    inputs = processor(text=[PROMPT, PROMPT], images=processor.postprocess(random_images(2)))
    codes = model.model.encode_images(inputs["pixel_values"])
    from_pixels = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    from_codes = model.generate(
        input_ids=inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        image_codes=codes,
        max_new_tokens=5,
        do_sample=False,
    )
    assert torch.equal(from_pixels, from_codes)


@pytest.mark.parametrize("quantizer,expected", [("vq", 16), ("rq", 32), ("hq", 20)])
def test_image_generation_writes_exactly_the_image_span_and_decodes_it(quantizer, expected):
    model, processor = tiny_mllm(quantizer)
    inputs = processor(text=["a red circle", "a big blue square on the left"], generation_mode="image")
    torch.manual_seed(0)
    sequences = model.generate(
        **inputs, generation_mode="image", guidance_scale=3.0, do_sample=True, top_k=50, top_p=0.9
    )
    prompt_length = inputs["input_ids"].shape[1]
    assert sequences.shape == (2, prompt_length + 1 + expected + 1)
    assert torch.equal(sequences[:, :prompt_length], inputs["input_ids"])
    codes, before, after = image_span(model, sequences)
    assert (before == model.config.boi_token_id).all() and (after == model.config.eoi_token_id).all()
    assert set(codes.flatten().tolist()) <= set(model.config.vq_config.codebook_token_ids)
    pixels = model.decode_image_tokens(sequences)
    assert pixels.shape == (2, 3, 16, 16)
    assert torch.equal(model.decode_image_tokens(codes), pixels)  # the bare ĥŵD ids decode alike
    images = processor.post_process_multimodal_output(pixels, generation_mode="image")
    assert [image.size for image in images] == [(16, 16), (16, 16)] and images[0].mode == "RGB"


def test_image_generation_with_and_without_kv_cache_is_identical():
    model, processor = tiny_mllm("rq")
    inputs = processor(text=["a red circle", "green triangle"], generation_mode="image")
    cached = model.generate(**inputs, generation_mode="image", guidance_scale=2.0, do_sample=False)
    uncached = model.generate(**inputs, generation_mode="image", guidance_scale=2.0, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_batched_guidance_equals_a_two_pass_reference():
    model, processor = tiny_mllm("rq")
    scale = 4.0
    inputs = processor(text=["a red circle", "a big blue square on the left of a triangle"], generation_mode="image")
    out = model.generate(
        **inputs,
        generation_mode="image",
        guidance_scale=scale,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
    )
    boi = torch.tensor([model.config.boi_token_id])
    n = model.config.image_tokens_per_generation
    for row in range(2):
        # Two passes, unpadded, no cache: the conditional and the unconditional prompt on their own.
        cond = inputs["input_ids"][row][inputs["attention_mask"][row].bool()]
        uncond = inputs["unconditional_input_ids"][row][inputs["unconditional_attention_mask"][row].bool()]
        codes = out.sequences[row, -n - 1 : -1]
        with torch.no_grad():
            cond_logits = model(input_ids=torch.cat([cond, boi, codes[:-1]])[None]).logits[0, -n:]
            uncond_logits = model(input_ids=torch.cat([uncond, boi, codes[:-1]])[None]).logits[0, -n:]
        reference = uncond_logits + scale * (cond_logits - uncond_logits)
        batched = torch.stack([step[row] for step in out.logits])
        torch.testing.assert_close(batched, reference, rtol=0, atol=1e-5)


def test_text_mode_keeps_an_image_span_well_formed():
    model, processor = tiny_mllm("vq")
    n = model.config.image_tokens_per_generation
    prompt = processor.image_generation_prompt("a red circle")
    ids = processor.tokenizer(prompt + "<boi>", return_tensors="pt").input_ids
    generated = model.generate(input_ids=ids, max_new_tokens=n + 1, do_sample=False)[0, ids.shape[1] :]
    assert set(generated[:n].tolist()) <= set(model.config.vq_config.codebook_token_ids)
    assert generated[n] == model.config.eoi_token_id
    # A partial image in the prompt is continued, not restarted.
    half = model.generate(input_ids=ids, max_new_tokens=n // 2, do_sample=False)
    rest = model.generate(input_ids=half, max_new_tokens=n // 2 + 1, do_sample=False)
    assert torch.equal(rest[0, ids.shape[1] :], generated)


def test_span_processor_masks_exactly_the_non_codes_and_then_forces_eoi():
    processor = UniCodeImageSpanLogitsProcessor([5, 7, 9], boi_token_id=1, eoi_token_id=2, tokens_per_image=2)
    scores = torch.zeros(3, 12)
    ids = torch.tensor([[3, 4, 1, 5], [3, 1, 5, 7], [1, 5, 7, 2]])  # one code in, span full, span closed
    out = processor(ids, scores)
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [5, 7, 9]
    assert torch.isfinite(out[1]).nonzero().flatten().tolist() == [2]
    assert torch.isfinite(out[2]).all()


def test_bad_generation_requests_raise_clear_errors():
    model, processor = tiny_mllm("rq", max_positions=40)
    inputs = processor(text="a red circle", generation_mode="image")
    with pytest.raises(ValueError, match="guidance_scale=0.0 must be a positive number"):
        model.generate(**inputs, generation_mode="image", guidance_scale=0.0)
    with pytest.raises(ValueError, match="guidance_scale=-1.0 must be a positive number"):
        model.generate(**inputs, generation_mode="image", guidance_scale=-1.0)
    with pytest.raises(ValueError, match="needs unconditional_input_ids"):
        model.generate(input_ids=inputs["input_ids"], generation_mode="image", guidance_scale=3.0)
    with pytest.raises(ValueError, match="max_position_embeddings=40"):
        model.generate(
            **processor(text="a red circle on the left of a big blue square", generation_mode="image"),
            generation_mode="image",
        )
    with pytest.raises(ValueError, match="generation_mode='video'"):
        model.generate(**inputs, generation_mode="video")
    with pytest.raises(ValueError, match="right-padded"):
        model.generate(
            input_ids=inputs["input_ids"],
            attention_mask=torch.cat([inputs["attention_mask"][:, 1:], torch.zeros(1, 1, dtype=torch.long)], 1),
            generation_mode="image",
        )
    with pytest.raises(ValueError, match="repeat the caption"):
        model.generate(input_ids=inputs["input_ids"], generation_mode="image", num_return_sequences=2, do_sample=True)
    with pytest.raises(ValueError, match="num_beams=1"):
        model.generate(input_ids=inputs["input_ids"], generation_mode="image", num_beams=2)
    with pytest.raises(ValueError, match="guidance_scale applies to generation_mode='image'"):
        model.generate(input_ids=inputs["input_ids"], guidance_scale=3.0, max_new_tokens=2)
    with pytest.raises(ValueError, match="fewer than 32 ids after its last <boi>"):
        model.decode_image_tokens(torch.tensor([[5, model.config.boi_token_id, 7]]))
