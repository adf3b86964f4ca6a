"""UniCodeConfig / UniCodeModel / UniCodeForConditionalGeneration: image scatter, aggregation,
training step, one stored codebook, Auto* round trips and clear errors."""

import copy
import inspect
import json

import pytest
import torch
from safetensors import safe_open
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoModelForMultimodalLM,
    AutoProcessor,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import TransformersKwargs
from utils_mllm import CODEBOOK_SIZE, HIDDEN, random_images, tiny_mllm, tiny_parts, vq_config

from modeling_unicode import (
    UniCodeConfig,
    UniCodeForConditionalGeneration,
    UniCodeImageFeaturesOutput,
    UniCodeModel,
    UniCodeProcessor,
    flatten_code_map,
    image_placeholder_count,
)

PROMPT = "USER: <image> what color is the circle? ASSISTANT:"


def image_batch(processor, n=2, answers=("red", "blue square")):
    texts = [f"{PROMPT} {answers[i % len(answers)]}" for i in range(n)]
    inputs = processor(text=texts, images=[img for img in processor.postprocess(random_images(n))])
    # Loss on answers only: everything up to and including "ASSISTANT:" is prompt.
    labels = inputs["input_ids"].clone()
    colon = processor.tokenizer.convert_tokens_to_ids(":")
    for row in range(n):
        last_colon = (inputs["input_ids"][row] == colon).nonzero().max()
        labels[row, : last_colon + 1] = -100
    labels[inputs["attention_mask"] == 0] = -100
    return inputs, labels


@pytest.mark.parametrize(
    "quantizer,visual_input,expected",
    [
        ("vq", "aggregate", 16),
        ("rq", "aggregate", 16),
        ("hq", "aggregate", 16),
        ("vq", "flatten", 16),
        ("rq", "flatten", 32),
        ("hq", "flatten", 20),
    ],
)
def test_placeholder_count_is_shared_by_config_processor_and_model(quantizer, visual_input, expected):
    model, processor = tiny_mllm(quantizer, visual_input=visual_input)
    assert model.config.image_seq_length == expected == processor.num_image_tokens
    assert image_placeholder_count(model.config.vq_config, visual_input) == expected
    inputs = processor(text=PROMPT, images=processor.postprocess(random_images(1)))
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == expected
    features = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    assert features.shape == (1, expected, HIDDEN)


def test_forward_backward_trains_the_llm_with_answer_only_labels_and_leaves_the_tokenizer_frozen():
    model, processor = tiny_mllm("rq")
    model.train()
    inputs, labels = image_batch(processor)
    out = model(**inputs, labels=labels)
    assert out.logits.shape[:2] == inputs["input_ids"].shape and torch.isfinite(out.loss)
    assert out.image_codes.shape == (2, 4, 4, 2)
    out.loss.backward()
    layer = model.model.language_model.layers[0]
    assert layer.self_attn.q_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in model.model.vision_tokenizer.parameters())
    assert not model.model.vision_tokenizer.training  # kept in eval under model.train()
    # Labels masked on prompts: a loss on the answers alone differs from a loss on everything.
    full = model(**inputs, labels=inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)).loss
    assert not torch.allclose(full, out.loss)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    model, processor = tiny_mllm("rq")
    inputs, labels = image_batch(processor)
    model.train()
    plain = model(**inputs, labels=labels).loss
    plain.backward()
    grad = model.lm_head.weight.grad.clone()
    model.zero_grad()
    model.activation_checkpointing_enable()
    assert model.is_activation_checkpointing
    checkpointed = model(**inputs, labels=labels).loss
    checkpointed.backward()
    torch.testing.assert_close(checkpointed, plain)
    torch.testing.assert_close(model.lm_head.weight.grad, grad)


def test_pixel_values_and_precomputed_image_codes_give_identical_logits():
    model, processor = tiny_mllm("hq")
    inputs, _ = image_batch(processor)
    with torch.no_grad():
        from_pixels = model(**inputs)
        codes = from_pixels.image_codes
        from_codes = model(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], image_codes=codes
        ).logits
        from_flat_codes = model(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], image_codes=flatten_code_map(codes)
        ).logits
    assert torch.equal(from_pixels.logits, from_codes) and torch.equal(from_codes, from_flat_codes)


@pytest.mark.parametrize("quantizer", ["vq", "rq", "hq"])
def test_aggregation_matches_its_definition(quantizer):
    model, _ = tiny_mllm(quantizer)
    codes = model.model.encode_images(random_images(1))
    rows = model.get_input_embeddings()(codes)[0]  # (ĥ, ŵ, D, H)
    features = model.model.get_image_features(image_codes=codes).pooler_output
    if quantizer == "hq":  # per top position, its 4 bottom codes each plus the top code, in layout order
        expected = (rows[:, :, :1] + rows[:, :, 1:]).reshape(-1, HIDDEN)
    else:  # vq: identity, rq: sum over depth
        expected = rows.sum(dim=2).reshape(-1, HIDDEN)
    torch.testing.assert_close(features[0], expected, rtol=0, atol=0)


def test_flatten_mode_reads_an_image_exactly_as_its_code_ids_written_as_text():
    model, processor = tiny_mllm("rq", visual_input="flatten")
    inputs = processor(text=PROMPT, images=processor.postprocess(random_images(1)))
    with torch.no_grad():
        out = model(**inputs)
        ids = inputs["input_ids"].clone()
        ids[ids == model.config.image_token_id] = flatten_code_map(out.image_codes)[0]
        as_text = model(input_ids=ids, attention_mask=inputs["attention_mask"]).logits
    torch.testing.assert_close(out.logits, as_text, rtol=0, atol=0)


def test_backbone_does_the_scatter_so_fused_heads_see_images():
    model, processor = tiny_mllm("rq")
    inputs, _ = image_batch(processor)
    with torch.no_grad():
        hidden = model.model(**inputs).last_hidden_state
        assert torch.equal(model.lm_head(hidden), model(**inputs).logits)
        no_images = model.model(
            input_ids=inputs["input_ids"].masked_fill(inputs["input_ids"] == model.config.image_token_id, 5),
            attention_mask=inputs["attention_mask"],
        ).last_hidden_state
    assert not torch.allclose(hidden, no_images)


@pytest.mark.parametrize("tie", [False, True])
def test_save_and_auto_load_round_trip_keeps_logits_and_one_codebook(tmp_path, tie):
    model, processor = tiny_mllm("hq", tie=tie)
    inputs, _ = image_batch(processor)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)

    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert not any("codebook" in key for key in keys)  # the codebook lives in the embedding table only
    assert sum(1 for key in keys if "embed_tokens" in key) == 1
    assert ("lm_head.weight" in keys) != tie
    config_json = json.loads((tmp_path / "config.json").read_text())
    assert config_json["model_type"] == "unicode" and config_json["vq_config"]["store_codebook"] is False
    assert config_json["tie_word_embeddings"] is tie

    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    loaded_processor = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, UniCodeForConditionalGeneration) and isinstance(loaded_processor, UniCodeProcessor)
    assert loaded_processor.num_image_tokens == processor.num_image_tokens
    assert loaded_processor.chat_template == processor.chat_template
    reloaded_inputs = loaded_processor(text=[PROMPT] * 2, images=processor.postprocess(random_images(2)))
    original_inputs = processor(text=[PROMPT] * 2, images=processor.postprocess(random_images(2)))
    for key in original_inputs:
        assert torch.equal(reloaded_inputs[key], original_inputs[key]), key
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)
    # The code vectors are the LLM's rows, bit for bit, after the load.
    ids = torch.tensor(loaded.config.vq_config.codebook_token_ids)
    assert torch.equal(loaded.model.vision_tokenizer.codebook_token_ids, ids)
    assert torch.equal(loaded.model.codebook(), loaded.get_input_embeddings().weight[ids])
    assert (loaded.lm_head.weight is loaded.get_input_embeddings().weight) == tie

    assert type(AutoModel.from_pretrained(tmp_path)) is UniCodeModel


def test_device_map_with_disk_offload_reads_and_writes_images_like_the_model_in_memory(tmp_path):
    # A model larger than the machine loads with device_map="auto": accelerate splits it across devices, CPU and disk.
    # The codebook is read from the (possibly offloaded) embedding table, so both directions must still agree.
    model, processor = tiny_mllm("rq")
    model.save_pretrained(tmp_path)
    inputs, _ = image_batch(processor)
    caption = processor(text=["a red circle"], generation_mode="image")
    offloaded = AutoModelForImageTextToText.from_pretrained(
        tmp_path, device_map="auto", max_memory={"cpu": "200KB"}, offload_folder=str(tmp_path / "offload")
    ).eval()
    assert "disk" in set(offloaded.hf_device_map.values())
    with torch.no_grad():
        assert torch.equal(offloaded(**inputs).logits, model(**inputs).logits)
        assert torch.equal(
            offloaded.generate(**inputs, max_new_tokens=4, do_sample=False),
            model.generate(**inputs, max_new_tokens=4, do_sample=False),
        )
        assert torch.equal(
            offloaded.generate(**caption, generation_mode="image", do_sample=False),
            model.generate(**caption, generation_mode="image", do_sample=False),
        )
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path)) is UniCodeForConditionalGeneration
    assert type(AutoModelForMultimodalLM.from_pretrained(tmp_path)) is UniCodeForConditionalGeneration
    assert AutoConfig.from_pretrained(tmp_path).visual_input == "aggregate"


def test_from_pretrained_parts_refuses_a_codebook_that_is_not_the_llm_rows():
    llm, tokenizer, vision = tiny_parts("rq")
    with torch.no_grad():
        vision.codebook[3] += 1e-3
    with pytest.raises(ValueError, match="codebook differs from the LLM's embedding rows"):
        UniCodeForConditionalGeneration.from_pretrained_parts(llm, tokenizer, vision)


def test_config_rejects_inconsistent_settings_with_the_fix():
    llm, _, vision = tiny_parts("rq")
    ids = vision.config.codebook_token_ids
    good = vq_config("rq", codebook_token_ids=ids)
    good.store_codebook = False
    with pytest.raises(ValueError, match="store_codebook=False"):
        UniCodeConfig(text_config=llm.config, vq_config=vq_config("rq", codebook_token_ids=ids))
    with pytest.raises(ValueError, match="visual_input"):
        UniCodeConfig(text_config=llm.config, vq_config=good, visual_input="concat")
    with pytest.raises(ValueError, match="code_dim"):
        UniCodeConfig(text_config={"model_type": "llama", "hidden_size": 64, "vocab_size": 400}, vq_config=good)
    with pytest.raises(ValueError, match="image_token_id=.* is also a visual code"):
        UniCodeConfig(text_config=llm.config, vq_config=good, image_token_id=ids[0])
    with pytest.raises(ValueError, match="codebook_token_ids is None"):
        no_ids = vq_config("rq")
        no_ids.store_codebook = False
        UniCodeConfig(text_config=llm.config, vq_config=no_ids)
    text_only = UniCodeConfig(text_config=llm.config)
    assert text_only.tie_word_embeddings is False and text_only.vq_config is None


def test_bad_image_inputs_raise_clear_errors():
    model, processor = tiny_mllm("rq")
    inputs, _ = image_batch(processor)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    codes = model.model.encode_images(inputs["pixel_values"])
    with pytest.raises(ValueError, match="placeholders but 1 image"):
        model(input_ids=ids, attention_mask=mask, pixel_values=inputs["pixel_values"][:1])
    with pytest.raises(ValueError, match="neither pixel_values nor image_codes"):
        model(input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError, match="either pixel_values or image_codes"):
        model(**inputs, image_codes=codes)
    outside = codes.clone()
    outside[0, 0, 0, 0] = model.config.boi_token_id
    with pytest.raises(ValueError, match="image_codes contains ids that are not visual codes"):
        model(input_ids=ids, attention_mask=mask, image_codes=outside)
    with pytest.raises(ValueError, match=r"image_codes must have shape \(num_images, 4, 4, 2\)"):
        model(input_ids=ids, attention_mask=mask, image_codes=codes[:, :2])
    with pytest.raises(TypeError, match="image_codes must be an integer"):
        model(input_ids=ids, attention_mask=mask, image_codes=codes.float())
    with pytest.raises(ValueError, match="resize to 16x16"):
        model(input_ids=ids, attention_mask=mask, pixel_values=torch.zeros(2, 3, 32, 32))


def test_a_text_only_config_refuses_images_and_image_generation():
    llm, _, _ = tiny_parts("rq")
    model = UniCodeForConditionalGeneration(UniCodeConfig(text_config=llm.config)).eval()
    ids = torch.tensor([[5, 6, 7]])
    assert model(input_ids=ids).logits.shape == (1, 3, llm.config.vocab_size)
    with pytest.raises(ValueError, match="vq_config=None"):
        model.generate(ids, generation_mode="image")
    with pytest.raises(ValueError, match="vq_config=None"):
        model(input_ids=ids, pixel_values=random_images(1))
    assert CODEBOOK_SIZE == 256


def test_image_position_embeddings_start_as_the_papers_input_and_save_with_the_model(tmp_path):
    """`config.image_position_embeddings`: one learned row per placeholder added to the code embeddings; added at zero
    the model is unchanged, once trained each placeholder differs, and the table saves and reloads."""
    model, processor = tiny_mllm()
    codes = model.model.encode_images(random_images(2))
    before = model.model.get_image_features(image_codes=codes).pooler_output
    table = model.model.add_image_position_embedding()
    assert model.config.image_position_embeddings and table.weight.shape == (
        model.config.image_seq_length,
        before.shape[-1],
    )
    same = model.model.get_image_features(image_codes=codes).pooler_output
    assert torch.equal(same, before)
    with torch.no_grad():
        table.weight.normal_()
    moved = model.model.get_image_features(image_codes=codes).pooler_output
    assert torch.allclose(moved - before, table.weight.expand_as(moved))
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path)
    assert reloaded.config.image_position_embeddings
    assert torch.equal(reloaded.model.image_position_embedding.weight, table.weight)
    assert torch.equal(reloaded.model.get_image_features(image_codes=codes).pooler_output, moved)


def test_image_input_adapter_starts_as_the_papers_input_remaps_each_placeholder_and_saves_with_the_model(tmp_path):
    """`config.image_input_adapter_size`: a residual MLP over each input-image placeholder's features. Added, the
    model is unchanged (its output layer is at zero); moved, every placeholder's features change while the codes and
    the codebook rows stay the tokenizer's; answers still generate; it saves and reloads; a size that is not a whole
    number >= 0 is refused by name."""
    model, processor = tiny_mllm()
    images = random_images(2)
    codes = model.model.encode_images(images)
    codebook = model.model.codebook().clone()
    before = model.model.get_image_features(image_codes=codes).pooler_output
    adapter = model.model.add_image_input_adapter(32)
    assert model.config.image_input_adapter_size == 32 and adapter.up.out_features == 32
    assert torch.equal(model.model.get_image_features(image_codes=codes).pooler_output, before)
    with torch.no_grad():
        adapter.down.weight.normal_(std=0.5)
    moved = model.model.get_image_features(image_codes=codes).pooler_output
    assert (moved - before).abs().sum(-1).gt(0).all()
    assert torch.equal(model.model.codebook(), codebook) and torch.equal(model.model.encode_images(images), codes)
    inputs = processor(text=PROMPT, images=processor.postprocess(images[:1]))
    answer = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    assert reloaded.config.image_input_adapter_size == 32
    assert torch.equal(reloaded.model.get_image_features(image_codes=codes).pooler_output, moved)
    assert torch.equal(reloaded.generate(**inputs, max_new_tokens=3, do_sample=False), answer)
    for bad in (-1, True, 2.5):
        with pytest.raises(ValueError, match=f"image_input_adapter_size={bad!r} must be a whole number >= 0"):
            type(model.config)(**{**model.config.to_dict(), "image_input_adapter_size": bad})
    with pytest.raises(ValueError, match="adds nothing"):
        model.model.add_image_input_adapter(0)


@pytest.mark.parametrize("layout", ["index", "axial"])
def test_a_model_built_from_a_config_with_stage_iis_additions_starts_them_at_zero(layout):
    """A config that already asks for the position tables and the adapter (a stage-II model rebuilt from its config,
    e.g. before loading a checkpoint into it) gets them at zero, as `add_…` makes them: the generic init of
    `post_init` must not draw them at random, or a fresh model would not compute what the paper's model does."""
    model, _ = tiny_mllm()
    config = type(model.config)(
        **{
            **model.config.to_dict(),
            "image_position_embeddings": True,
            "code_position_embeddings": True,
            "position_embedding_layout": layout,
            "image_input_adapter_size": 16,
        }
    )
    built = type(model)(config).model
    for table in (built.image_position_embedding, built.code_position_embedding):
        assert all(p.abs().sum() == 0 for p in table.parameters())
    adapter = built.image_input_adapter
    assert adapter.down.weight.abs().sum() == 0 and adapter.down.bias.abs().sum() == 0
    assert adapter.up.weight.abs().sum() > 0  # only the output layer starts at zero


def test_code_position_embeddings_index_each_written_code_and_generation_matches_without_the_cache(tmp_path):
    """`config.code_position_embeddings`: each code id gets the row of its index in its image (counted since `<boi>`,
    carried across turns), other tokens none; the cached decoding loop passes the index it writes, so its codes
    equal the uncached loop's; the table saves and reloads."""
    model, processor = tiny_mllm()
    codes = model.model.codebook_token_ids[:5].tolist()
    boi, text = model.config.boi_token_id, 3
    ids = torch.tensor([[text, boi, codes[0], codes[1], text, codes[2], boi, codes[3], text]])
    assert model.model.code_indices(ids).tolist() == [[-1, -1, 0, 1, -1, 2, -1, 0, -1]]
    logits_before = model(input_ids=ids).logits
    table = model.model.add_code_position_embedding()
    assert table.weight.shape[0] == model.config.image_tokens_per_generation
    assert torch.equal(model(input_ids=ids).logits, logits_before)  # added at zero: the same model
    with torch.no_grad():
        table.weight.normal_(std=0.5)
    assert not torch.allclose(model(input_ids=ids).logits[0, 2:], logits_before[0, 2:])
    assert torch.allclose(
        model(input_ids=ids).logits[0, :2], logits_before[0, :2], atol=1e-6
    )  # text before codes: untouched
    inputs = processor(text=["a red circle", "a blue square"], generation_mode="image")
    cached = model.generate(**inputs, generation_mode="image", guidance_scale=2.0)
    uncached = model.generate(**inputs, generation_mode="image", guidance_scale=2.0, use_cache=False)
    assert torch.equal(cached, uncached)
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path)
    assert reloaded.config.code_position_embeddings and torch.equal(
        reloaded.model.code_position_embedding.weight, table.weight
    )


@pytest.mark.parametrize("quantizer,visual_input", [("rq", "aggregate"), ("hq", "aggregate"), ("rq", "flatten")])
def test_axial_position_tables_give_every_cell_of_a_grid_row_its_row_vector(quantizer, visual_input, tmp_path):
    """`position_embedding_layout="axial"`: both tables add row + column + level vectors. Added at zero the model is
    unchanged; a vector put on grid row 0 reaches exactly the placeholders and the written codes of that row; cached
    and uncached generation agree; the layout and the tables save and reload."""
    model, processor = tiny_mllm(quantizer, visual_input)
    model.config.position_embedding_layout = "axial"
    codes = model.model.encode_images(random_images(2))
    before = model.model.get_image_features(image_codes=codes).pooler_output
    image_table = model.model.add_image_position_embedding()
    code_table = model.model.add_code_position_embedding()
    assert torch.equal(model.model.get_image_features(image_codes=codes).pooler_output, before)
    vq = model.config.vq_config
    fine = 2 if quantizer == "hq" and visual_input == "aggregate" else 1  # HQ placeholders sit on the bottom grid
    per_grid_row = vq.code_grid_size * fine * (vq.depth if visual_input == "flatten" else 1)
    with torch.no_grad():
        image_table.rows.weight[0] = 1.0
        code_table.rows.weight[0] = 1.0
    shift = model.model.get_image_features(image_codes=codes).pooler_output - before
    on_first_row = shift.abs().sum(-1) > 0
    if quantizer == "hq" and visual_input == "aggregate":  # per top position its 2x2 block: bottom row 0 is q 0, 1
        index = torch.arange(on_first_row.shape[1])
        expected = (index // 4 < vq.code_grid_size) & (index % 4 < 2)
    else:
        expected = torch.arange(on_first_row.shape[1]) < per_grid_row
    assert torch.equal(on_first_row[0], expected) and int(expected.sum()) == per_grid_row
    index = torch.arange(model.config.image_tokens_per_generation)
    written = model.model.code_position_rows(index).abs().sum(-1) > 0
    assert torch.equal(written, index < vq.code_grid_size * vq.depth)
    with torch.no_grad():
        code_table.columns.weight.normal_(std=0.5)
    inputs = processor(text=["a red circle"], generation_mode="image")
    cached = model.generate(**inputs, generation_mode="image", guidance_scale=2.0)
    assert torch.equal(cached, model.generate(**inputs, generation_mode="image", guidance_scale=2.0, use_cache=False))
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path)
    assert reloaded.config.position_embedding_layout == "axial"
    assert torch.equal(reloaded.model.code_position_embedding.columns.weight, code_table.columns.weight)
    assert torch.equal(reloaded.model.get_image_features(image_codes=codes).pooler_output, before + shift)


def test_an_unknown_position_layout_is_refused_by_name():
    model, _ = tiny_mllm()
    with pytest.raises(ValueError, match="position_embedding_layout='grid' is not supported"):
        type(model.config)(**{**model.config.to_dict(), "position_embedding_layout": "grid"})


# -- the transformers v5 model interface (what transformers' common model tests check, in our words) --------------
@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
def test_the_legacy_past_key_values_name_continues_from_the_cache_like_cache():
    model, processor = tiny_mllm("rq")
    inputs, _ = image_batch(processor, n=1)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        full = model(**inputs).logits[:, -1]
        prefix = model(
            input_ids=ids[:, :-1], attention_mask=mask[:, :-1], pixel_values=inputs["pixel_values"], use_cache=True
        )
        step = {"input_ids": ids[:, -1:], "attention_mask": mask}
        with_cache = model(**step, cache=copy.deepcopy(prefix.cache)).logits[:, -1]
        with_legacy_name = model(**step, past_key_values=copy.deepcopy(prefix.cache)).logits[:, -1]
        backbone = model.model(**step, past_key_values=copy.deepcopy(prefix.cache)).last_hidden_state[:, -1]
    torch.testing.assert_close(with_cache, full, rtol=1e-4, atol=1e-5)
    assert torch.equal(with_legacy_name, with_cache)
    assert torch.equal(model.lm_head(backbone), with_cache)


def test_return_dict_false_gives_the_outputs_as_a_tuple():
    model, processor = tiny_mllm("rq")
    inputs, labels = image_batch(processor)
    with torch.no_grad():
        as_dict = model(**inputs, labels=labels)
        as_tuple = model(**inputs, labels=labels, return_dict=False)
        backbone = model.model(**inputs, return_dict=False)
        model.config.return_dict = False
        from_config = model(**inputs)
    assert isinstance(as_tuple, tuple) and isinstance(backbone, tuple) and isinstance(from_config, tuple)
    assert torch.equal(as_tuple[0], as_dict.loss) and torch.equal(as_tuple[1], as_dict.logits)
    assert torch.equal(model.lm_head(backbone[0]), from_config[0])


@pytest.mark.parametrize("tie", [False, True])
def test_resizing_the_vocabulary_keeps_the_codebook_and_refuses_to_cut_into_it(tie):
    model, _ = tiny_mllm("rq", tie=tie)
    ids = model.model.codebook_token_ids
    rows = model.get_input_embeddings().weight.shape[0]
    codebook, head = model.model.codebook().detach().clone(), model.lm_head.weight.detach().clone()
    images = random_images(2)
    codes = model.model.encode_images(images)

    largest = max(model.config.vq_config.codebook_token_ids)
    with pytest.raises(
        ValueError, match=rf"new_num_tokens={largest}\b.*the codebook's largest id {largest}\b.*>= {rows}"
    ):
        model.resize_token_embeddings(largest)
    assert model.get_input_embeddings().weight.shape[0] == rows == model.config.get_text_config().vocab_size

    model.resize_token_embeddings(rows + 10)
    assert model.get_input_embeddings().weight.shape[0] == rows + 10 == model.lm_head.weight.shape[0]
    assert torch.equal(model.model.codebook(), codebook)  # bit for bit
    assert torch.equal(model.lm_head.weight[:rows], head)
    assert torch.equal(model.model.encode_images(images), codes)
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == tie
    assert torch.equal(model.model.codebook_token_ids, ids)


def test_a_shrink_that_keeps_every_id_images_use_is_allowed_and_one_past_them_is_refused():
    model, _ = tiny_mllm("rq")
    rows = model.get_input_embeddings().weight.shape[0]
    model.config.eoi_token_id = None  # frees the last row: the tiny tokenizer adds <image>, <boi>, <eoi> last
    model.resize_token_embeddings(rows - 1)
    assert model.get_input_embeddings().weight.shape[0] == rows - 1 == model.config.get_text_config().vocab_size
    boi = model.config.boi_token_id
    with pytest.raises(ValueError, match=rf"new_num_tokens={boi}\b.*boi_token_id={boi}\b.*>= {boi + 1}"):
        model.resize_token_embeddings(boi)


def test_get_image_features_returns_the_standard_output_and_takes_the_standard_flags():
    model, processor = tiny_mllm("rq")
    inputs, _ = image_batch(processor)
    vq = model.config.vq_config
    with torch.no_grad():
        features = model.get_image_features(pixel_values=inputs["pixel_values"])
        as_tuple = model.model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=False)
        with_hidden = model.model.get_image_features(pixel_values=inputs["pixel_values"], output_hidden_states=True)
        from_codes = model.model.get_image_features(image_codes=features.image_codes)
    assert isinstance(features, BaseModelOutputWithPooling) and isinstance(features, UniCodeImageFeaturesOutput)
    assert features.pooler_output.shape == (2, model.config.image_seq_length, HIDDEN)
    assert features.last_hidden_state.shape == (2, vq.tokens_per_image, HIDDEN)
    assert torch.equal(
        features.last_hidden_state, model.get_input_embeddings()(flatten_code_map(features.image_codes))
    )
    assert torch.equal(features.image_codes, model.model.encode_images(inputs["pixel_values"]))
    assert features.hidden_states is None and from_codes.hidden_states is None
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], features.last_hidden_state)
    levels = model.model.vision_tokenizer.encoder.feature_levels
    assert len(with_hidden.hidden_states) == len(levels) and all(h.shape[0] == 2 for h in with_hidden.hidden_states)
    for output in (with_hidden, from_codes):
        assert torch.equal(output.pooler_output, features.pooler_output)
    # What forward scatters into the placeholders is the pooler output.
    placeholders = inputs["input_ids"] == model.config.image_token_id
    seen = {}
    handle = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True
    )
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    assert torch.equal(seen["embeds"][placeholders], features.pooler_output.reshape(-1, HIDDEN))


@pytest.mark.parametrize("tie", [False, True])
def test_the_tensor_parallel_plan_shards_the_head_with_the_embeddings(tie):
    model, _ = tiny_mllm("rq", tie=tie)
    embedding = "model.language_model.embed_tokens"
    assert model.tp_plan[embedding] == "embedding_rowwise" and model.tp_plan["lm_head"] == "colwise_gather_output"
    # An LLM without a plan: neither is sharded.
    config = copy.deepcopy(model.config)
    config.text_config.base_model_tp_plan = None
    plain = UniCodeForConditionalGeneration(config)
    assert embedding not in plain.tp_plan and "lm_head" not in plain.tp_plan


@pytest.mark.parametrize("cls", [UniCodeModel, UniCodeForConditionalGeneration])
def test_forward_takes_transformers_standard_typed_kwargs(cls):
    for method in (cls.forward, cls.get_image_features):
        kwargs = inspect.signature(method).parameters["kwargs"]
        typed = kwargs.annotation.__args__[0]
        assert typed is TransformersKwargs and {"output_attentions", "output_hidden_states"} <= set(
            typed.__annotations__
        )
    assert "cache" in inspect.signature(cls.forward).parameters
