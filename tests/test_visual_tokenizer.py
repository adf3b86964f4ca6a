"""UniCodeVisualTokenizer: shapes per quantizer, Auto* round trip, presets, and clear errors."""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModel

from modeling_unicode import (
    UniCodeCodebookLearning,
    UniCodeVisualTokenizer,
    UniCodeVisualTokenizerConfig,
    unflatten_code_map,
)
from modeling_unicode.configuration_unicode import TRAINING_ONLY_KEYS
from modeling_unicode.modeling_unicode_vq import UniCodeVQConv2d
from training.presets import list_presets, vision_tokenizer_config

TOKEN_OFFSET = 500  # codes are vocabulary ids, not 0..K-1
SIZE = vision_tokenizer_config("tiny", codebook_token_ids=list(range(256)), codebook_size=256).image_size
GRID = SIZE // 8  # the tiny encoder downsamples 8x


def tiny(quantizer, depth=2, **overrides):
    overrides.setdefault("codebook_size", 256)
    ids = list(range(TOKEN_OFFSET, TOKEN_OFFSET + overrides["codebook_size"]))
    config = vision_tokenizer_config("tiny", quantizer=quantizer, depth=depth, codebook_token_ids=ids, **overrides)
    torch.manual_seed(0)
    return UniCodeVisualTokenizer(config).eval()


def images(n=2, size=SIZE):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(n)) * 2 - 1


@pytest.mark.parametrize(
    "quantizer,depth,grid", [("vq", 1, GRID), ("rq", 2, GRID), ("rq", 4, GRID), ("hq", 5, GRID // 2)]
)
def test_encode_decode_shapes_for_the_tiny_preset(quantizer, depth, grid):
    model = tiny(quantizer, depth)
    codes = model.encode(images())
    assert codes.shape == (2, grid, grid, depth) and codes.dtype == torch.long
    assert codes.min() >= TOKEN_OFFSET and codes.max() < TOKEN_OFFSET + 256
    assert model.config.tokens_per_image == grid * grid * depth
    assert model.decode(codes).shape == (2, 3, SIZE, SIZE)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_tokenizer_takes_the_image_processors_float32_pixels(tmp_path, dtype):
    # from_pretrained(..., dtype=torch.bfloat16) is how people serve models; the processor still gives float32.
    model = tiny("rq")
    model.save_pretrained(tmp_path)
    half = AutoModel.from_pretrained(tmp_path, dtype=dtype).eval()
    pixel_values = images()
    codes = half.encode(pixel_values)
    assert codes.shape == model.encode(pixel_values).shape
    reconstruction = half.decode(codes)
    assert reconstruction.dtype == dtype and reconstruction.shape == (2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert half(pixel_values).reconstruction.dtype == dtype


def test_forward_returns_losses_and_statistics_and_trains_the_encoder():
    model = tiny("rq").train()
    out = model(images())
    assert out.reconstruction.shape == (2, 3, SIZE, SIZE)
    assert out.code_counts.sum() == 2 * GRID * GRID * 2 and out.code_sums.shape == (256, 256)
    assert 0 < out.codebook_usage <= 1 and out.perplexity >= 1
    out.loss.backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0  # straight-through reaches the encoder
    assert model.codebook.grad is None  # the codebook learns only through its paradigm


def test_hidden_states_are_the_encoders_feature_maps_on_request_and_change_nothing_else():
    model = tiny("rq")
    with torch.no_grad():
        plain = model(images())
        out = model(images(), output_hidden_states=True)
        model.config.return_dict = False
        as_tuple = model(images())
    assert plain.hidden_states is None and isinstance(as_tuple, tuple)
    assert len(out.hidden_states) == len(model.encoder.feature_levels)
    assert out.hidden_states[0].shape == (2, model.config.base_channels, SIZE, SIZE)  # the stem, at full resolution
    assert out.hidden_states[-1].shape[-1] == GRID  # the middle block, at the latent grid
    assert torch.equal(out.codes, plain.codes) and torch.equal(out.reconstruction, plain.reconstruction)


@pytest.mark.parametrize("quantizer", ["rq", "hq"])
def test_a_patch_encoder_codes_each_cell_from_its_own_pixels_only(quantizer, tmp_path):
    """`encoder_receptive_field="patch"`: repainting one latent cell's pixels changes that cell's features and no
    other (the image encoder changes them all); hidden states keep their image layout; the setting saves."""
    local = tiny(quantizer, encoder_receptive_field="patch", encoder_patch_cells=1)
    whole = tiny(quantizer, encoder_receptive_field="image", encoder_patch_cells=1)
    cells = local.config.latent_grid_size
    patch = SIZE // cells
    before = images()
    after = before.clone()
    after[:, :, patch : 2 * patch, :patch] = 1.0  # latent cell (1, 0)
    with torch.no_grad():
        moved = (local.encode_features(after) - local.encode_features(before)).abs().sum(1) > 0
        moved_whole = (whole.encode_features(after) - whole.encode_features(before)).abs().sum(1) > 0
        hidden = local(before, output_hidden_states=True).hidden_states
    expected = torch.zeros(cells, cells, dtype=torch.bool)
    expected[1, 0] = True
    assert torch.equal(moved, expected.expand_as(moved))
    assert int(moved_whole[0].sum()) > 1
    assert hidden[0].shape == (2, local.config.base_channels, SIZE, SIZE) and hidden[-1].shape[-1] == cells
    local.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).encoder_receptive_field == "patch"


def test_convolutions_of_one_by_one_maps_match_plain_convolutions_in_value_and_gradient(monkeypatch):
    """The patch encoder's 1 x 1 maps go through `UniCodeVQConv2d`'s matrix product: its features, its loss's
    gradients and the saved parameters are those of plain convolutions; other maps take the convolution itself."""
    model = tiny("rq", encoder_receptive_field="patch", encoder_patch_cells=1).train()
    pixels = images()

    def features_and_gradients():
        model.zero_grad()
        features = model.encode_features(pixels)
        features.square().mean().backward()
        return features.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    product, product_grads = features_and_gradients()
    with monkeypatch.context() as patch:
        patch.setattr(UniCodeVQConv2d, "forward", torch.nn.Conv2d.forward)
        plain, plain_grads = features_and_gradients()
    torch.testing.assert_close(product, plain)
    assert product_grads.keys() == plain_grads.keys() and len(plain_grads) > 10
    for name, grad in plain_grads.items():
        torch.testing.assert_close(product_grads[name], grad, msg=name)
    assert sorted(model.encoder.conv_out.state_dict()) == ["bias", "weight"]
    assert model.encoder.conv_out.weight.shape[-2:] == (3, 3)
    strided = UniCodeVQConv2d(4, 4, 3, stride=2)
    map_2x2 = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(strided(map_2x2), torch.nn.Conv2d.forward(strided, map_2x2))


def test_encoder_patches_of_two_cells_see_their_block_and_nothing_else(tmp_path):
    """`encoder_patch_cells=2`: repainting one latent cell's pixels changes the features of the 2 x 2 block it lies
    in (each code sees its neighbours in the block, e.g. the rest of a shape) and of no other cell; it saves."""
    model = tiny("rq", encoder_receptive_field="patch", encoder_patch_cells=2)
    cells = model.config.latent_grid_size
    patch = SIZE // cells
    before = images()
    after = before.clone()
    after[:, :, patch : 2 * patch, :patch] = 1.0  # latent cell (1, 0), in the block of cells (0..1, 0..1)
    with torch.no_grad():
        moved = (model.encode_features(after) - model.encode_features(before)).abs().sum(1) > 0
    expected = torch.zeros(cells, cells, dtype=torch.bool)
    expected[:2, :2] = True
    assert torch.equal(moved, expected.expand_as(moved))
    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).encoder_patch_cells == 2


@pytest.mark.parametrize("quantizer", ["rq", "hq"])
def test_a_patch_decoder_paints_each_cell_from_its_own_latent(quantizer, tmp_path):
    """`decoder_receptive_field="patch"`: a change to one latent cell repaints that cell's pixels; the others move only
    through the image-wide norm statistics, far less than the cell itself (the image decoder's convolutions repaint
    the neighbours as much as the cell). The setting saves."""

    def change_per_pixel(model):
        cells = model.config.latent_grid_size
        latent = torch.randn(1, model.config.z_channels, cells, cells, generator=torch.Generator().manual_seed(0))
        nudged = latent.clone()
        nudged[:, :, 1, 0] += 1.0
        with torch.no_grad():
            return (model.decoder(nudged) - model.decoder(latent)).abs().sum(1)[0], SIZE // cells

    local, patch = change_per_pixel(tiny(quantizer, decoder_receptive_field="patch"))
    whole, _ = change_per_pixel(tiny(quantizer, decoder_receptive_field="image"))
    cell = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    cell[patch : 2 * patch, :patch] = True
    assert local[~cell].mean() < 0.2 * local[cell].mean()
    assert whole[~cell].mean() > 0.5 * whole[cell].mean()
    model = tiny(quantizer, decoder_receptive_field="patch")
    assert model(images()).reconstruction.shape == (2, 3, SIZE, SIZE)
    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).decoder_receptive_field == "patch"


def test_save_and_auto_load_round_trip_is_bit_exact(tmp_path):
    model = tiny("hq")
    pixel_values = images(3)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert AutoConfig.from_pretrained(tmp_path).model_type == "unicode_vq"
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, UniCodeVisualTokenizer)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    codes = model.encode(pixel_values)
    assert torch.equal(loaded.encode(pixel_values), codes)
    assert torch.equal(loaded.decode(codes), model.decode(codes))


def test_external_codebook_replaces_the_stored_one():
    model = tiny("vq")
    external = torch.randn(256, 256)
    without_store = UniCodeVisualTokenizer(
        UniCodeVisualTokenizerConfig(**{**model.config.to_dict(), "store_codebook": False})
    ).eval()
    without_store.load_state_dict({k: v for k, v in model.state_dict().items() if k != "codebook"})
    pixel_values = images()
    assert torch.equal(
        without_store.encode(pixel_values, codebook=external), model.encode(pixel_values, codebook=external)
    )
    with pytest.raises(ValueError, match="stores no codebook"):
        without_store.encode(pixel_values)
    with pytest.raises(ValueError, match="codebook must have shape"):
        model.encode(pixel_values, codebook=torch.randn(10, 256))


def test_bad_pixel_values_get_clear_errors():
    model = tiny("vq")
    with pytest.raises(ValueError, match=rf"\(batch, 3, {SIZE}, {SIZE}\).*RGB"):
        model.encode(torch.zeros(1, 1, SIZE, SIZE))
    with pytest.raises(ValueError, match=f"image_size is {SIZE}"):
        model.encode(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="NaN or inf"):
        model.encode(torch.full((1, 3, SIZE, SIZE), float("nan")))
    with pytest.raises(TypeError, match="float tensor"):
        model.encode(torch.zeros(1, 3, SIZE, SIZE, dtype=torch.uint8))
    with pytest.raises(TypeError, match="torch.Tensor"):
        model.encode([[0.0]])


def test_bad_codes_get_clear_errors():
    model = tiny("rq")
    codes = model.encode(images(1))
    with pytest.raises(ValueError, match="not visual codes"):
        model.decode(codes - TOKEN_OFFSET)  # 0..K-1 are not the vocabulary ids
    with pytest.raises(ValueError, match=rf"shape \(batch, {GRID}, {GRID}, 2\)"):
        model.decode(codes[..., :1])
    with pytest.raises(TypeError, match="integer"):
        model.decode(codes.float())
    flat = codes.reshape(1, -1)
    assert torch.equal(unflatten_code_map(flat, GRID, 2), codes)


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"image_size": 60}, "image_size=60 is not divisible"),
        ({"quantizer": "rq", "depth": 0}, "depth=0 must be >= 1"),
        ({"codebook_size": 4, "codebook_token_ids": [1, 2, 3]}, "has 3 ids but codebook_size=4"),
        ({"codebook_size": 3, "codebook_token_ids": [1, 2, 2]}, "repeated ids"),
        ({"quantizer": "pq"}, "quantizer='pq' is not supported"),
        ({"encoder_receptive_field": "cell"}, "encoder_receptive_field='cell' is not supported"),
        ({"decoder_receptive_field": "cell"}, "decoder_receptive_field='cell' is not supported"),
        ({"encoder_patch_cells": 2}, "set encoder_receptive_field='patch' too"),
        ({"encoder_receptive_field": "patch", "encoder_patch_cells": 5}, "must be a positive divisor"),
    ],
)
def test_config_validation_names_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        UniCodeVisualTokenizerConfig(**overrides)


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"paradigm": "joint"}, "paradigm='joint' is not supported"),
        ({"blend_schedule": "cosine"}, "blend_schedule='cosine' is not supported"),
        ({"ema_decay": 1.0}, "ema_decay=1.0 must be in"),
        ({"dual_sync_interval": 0}, "dual_sync_interval=0 must be >= 1"),
    ],
)
def test_codebook_learning_validation_names_the_field(settings, message):
    with pytest.raises(ValueError, match=message):
        UniCodeCodebookLearning(**settings)


def test_a_tokenizer_saved_with_stage_one_settings_still_loads_and_saves_without_them(tmp_path):
    """Folders saved before the codebook-learning settings left the config carry `paradigm`, `ema_*`, `blend_*`,
    `dual_*`: they load, and what they save again describes the tokenizer only."""
    config = vision_tokenizer_config("tiny", codebook_token_ids=list(range(256)), codebook_size=256)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert not set(saved) & set(TRAINING_ONLY_KEYS)
    saved.update(paradigm="dual", ema_decay=0.9, blend_tail_fraction=0.5, dual_row_norm="llm", dead_code_threshold=0.1)
    (tmp_path / "config.json").write_text(json.dumps(saved))
    loaded = UniCodeVisualTokenizerConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()


def test_presets_exist_and_base_matches_the_paper_architecture():
    assert {"tiny", "base"} <= set(list_presets())
    config = vision_tokenizer_config("base")
    assert (config.image_size, config.base_channels, config.channel_multipliers) == (256, 128, [1, 1, 2, 2, 4])
    assert (config.code_grid_size, config.latent_grid_size, config.depth) == (8, 16, 5)
    with torch.device("meta"):
        model = UniCodeVisualTokenizer(config)
    without_codebook = sum(p.numel() for name, p in model.named_parameters() if name != "codebook")
    # VQGAN f16 encoder/decoder + 1x1 projections to Vicuna's 4096-wide rows: 73.8 M measured
    # (docs/paper.md: "about 81 M" for the released RQ/HQ variant).
    assert 70e6 < without_codebook < 85e6
    assert model.codebook.shape == (16384, 4096)
    latent = model.encoder(torch.empty(1, 3, 256, 256, device="meta"))
    assert latent.shape == (1, 256, 16, 16)


def test_fitted_level_scales_and_codebook_projection_are_saved_and_used_to_decode(tmp_path):
    model = tiny("rq", level_scales=True, codebook_projection=True)
    codes = model.encode(images())
    before = model.decode(codes)
    with torch.no_grad():  # as after training: neither is the identity any more
        model.quantizer.level_scale.copy_(torch.tensor([1.5, 0.4]))
        model.quantizer.codebook_projection.weight.mul_(0.8)
    changed = model.decode(codes)
    assert not torch.allclose(changed, before)
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert torch.equal(loaded.quantizer.level_scale, model.quantizer.level_scale)
    assert torch.equal(loaded.decode(codes), changed)
