"""UniCode against transformers' own common model tests, as every model in transformers is tested.

`UniCodeModelTest` runs `ModelTesterMixin` (fetched at test time from the transformers source distribution matching
the installed version, see utils_transformers_tests.py) against `UniCodeModel` and
`UniCodeForConditionalGeneration`; `UniCodeVisualTokenizerTest` runs it against the visual tokenizer. The source
distribution does not ship `GenerationTesterMixin`, so `UniCodeGenerationTest` checks what its tests check, in this
repository's words. Every skip says why the test cannot apply to this model.
"""

import copy
import unittest
from unittest.mock import patch

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES, MODEL_MAPPING_NAMES
from utils_transformers_tests import CommonTestsUnavailable, load_modeling_common

from modeling_unicode import (
    UniCodeConfig,
    UniCodeForConditionalGeneration,
    UniCodeModel,
    UniCodeVisualTokenizer,
    UniCodeVisualTokenizerConfig,
)


class UniCodeModelTester:
    """A tiny UniCode MLLM and a batch with one image per row: 4 text ids, the image's placeholders, 4 text ids.

    Every id the images use (the codebook, `<image>`, `<boi>`, `<eoi>`) sits low in the vocabulary, so the common
    resize test may shrink the vocabulary by 15 rows without reaching them.
    """

    def __init__(self, parent=None, batch_size=7, text_length=4, is_training=True):
        # 7 rows: the eager/SDPA comparison runs 7 rows and pads the inputs it is given with rows of ids < 5,
        # which hold no `<image>` and so need no image; giving it 7 rows with their images keeps them matched.
        self.parent = parent
        self.batch_size = batch_size
        self.is_training = is_training
        self.vocab_size = 99
        self.hidden_size = 32
        self.num_hidden_layers = 2
        self.num_attention_heads = 4
        self.image_token_id, self.boi_token_id, self.eoi_token_id = 7, 8, 9
        self.codebook_token_ids = list(range(10, 42))
        self.text_config = {
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": 37,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": 2,
            "max_position_embeddings": 512,
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 2,
        }
        self.vq_config = {
            "image_size": 16,
            "base_channels": 8,
            "channel_multipliers": [1, 2, 2],
            "z_channels": 8,
            "quantizer": "rq",
            "depth": 2,
            "codebook_size": len(self.codebook_token_ids),
            "code_dim": self.hidden_size,
            "codebook_token_ids": self.codebook_token_ids,
            "store_codebook": False,
        }
        self.text_length = text_length
        self.image_seq_length = 16  # 4x4 code grid, RQ aggregated to one vector per position
        self.seq_length = 2 * text_length + self.image_seq_length

    def get_config(self, text_only: bool = False) -> UniCodeConfig:
        return UniCodeConfig(
            text_config=LlamaConfig(**{k: v for k, v in self.text_config.items() if k != "model_type"}),
            vq_config=UniCodeVisualTokenizerConfig(**self.vq_config),
            # Without an `<image>` id any id is text: for tests that feed random ids over the whole vocabulary,
            # which the model would otherwise refuse as placeholders with no image to fill them.
            image_token_id=None if text_only else self.image_token_id,
            boi_token_id=self.boi_token_id,
            eoi_token_id=self.eoi_token_id,
        )

    def text_ids(self, length: int) -> torch.LongTensor:
        # Above every special id, so only the placeholders are `<image>` and no row opens an image span.
        return torch.randint(self.codebook_token_ids[-1] + 1, self.vocab_size, (self.batch_size, length))

    def prepare_config_and_inputs_for_common(self):
        placeholders = torch.full((self.batch_size, self.image_seq_length), self.image_token_id)
        input_ids = torch.cat([self.text_ids(self.text_length), placeholders, self.text_ids(self.text_length)], dim=1)
        pixel_values = torch.rand(self.batch_size, 3, 16, 16) * 2 - 1
        inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values": pixel_values}
        return self.get_config(), inputs


try:
    common = load_modeling_common()
    UNAVAILABLE = None
except CommonTestsUnavailable as error:
    common, UNAVAILABLE = None, str(error)


if common is None:

    def test_transformers_common_model_tests():
        pytest.skip(f"transformers' common model tests are not available: {UNAVAILABLE}")

else:

    class UniCodeModelTest(common.ModelTesterMixin, unittest.TestCase):
        all_model_classes = (UniCodeModel, UniCodeForConditionalGeneration)
        additional_model_inputs = ["pixel_values"]
        _is_composite = True
        # The image features are in the LLM's width (the codebook IS LLM rows); the common test expects a vision
        # tower's width, which the conv tokenizer does not have. test_get_image_features_shapes checks them instead.
        skip_test_image_features_output_shape = True

        @classmethod
        def setUpClass(cls):
            # The common tests learn what a class is (a bare backbone, an image-text-to-text head that takes labels)
            # from transformers' static name tables, which list only transformers' own models; modeling_unicode
            # registers these classes with AutoModel and AutoModelForImageTextToText at run time instead.
            cls.registered = [
                patch.dict(MODEL_MAPPING_NAMES, {UniCodeConfig.model_type: UniCodeModel.__name__}),
                patch.dict(
                    MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
                    {UniCodeConfig.model_type: UniCodeForConditionalGeneration.__name__},
                ),
            ]
            for registration in cls.registered:
                registration.start()

        @classmethod
        def tearDownClass(cls):
            for registration in cls.registered:
                registration.stop()

        def setUp(self):
            self.model_tester = UniCodeModelTester(self)

        def run_text_only(self, test):
            tester = self.model_tester
            with patch.object(tester, "get_config", lambda: UniCodeModelTester.get_config(tester, text_only=True)):
                test()

        # RoPE scaling of the LLM, on random ids over the whole vocabulary and no images.
        def test_model_rope_scaling_from_config_0_linear(self):
            self.run_text_only(super().test_model_rope_scaling_from_config_0_linear)

        def test_model_rope_scaling_from_config_1_dynamic(self):
            self.run_text_only(super().test_model_rope_scaling_from_config_1_dynamic)

        def test_model_rope_scaling_from_config_2_yarn(self):
            self.run_text_only(super().test_model_rope_scaling_from_config_2_yarn)

        def _image_features_get_expected_num_hidden_states(self, model_tester=None):
            # One per level of the tokenizer's encoder (stem, stages, middle), not per LLM layer.
            return len(UniCodeVisualTokenizer(self.model_tester.get_config().vq_config).encoder.feature_levels)

        def test_get_image_features_shapes(self):
            config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
            model = UniCodeForConditionalGeneration(config).eval()
            with torch.no_grad():
                features = model.get_image_features(pixel_values=inputs["pixel_values"])
            tester, vq = self.model_tester, config.vq_config
            self.assertEqual(
                features.last_hidden_state.shape, (tester.batch_size, vq.tokens_per_image, tester.hidden_size)
            )
            self.assertEqual(
                features.pooler_output.shape, (tester.batch_size, tester.image_seq_length, tester.hidden_size)
            )
            self.assertEqual(
                features.image_codes.shape, (tester.batch_size, vq.code_grid_size, vq.code_grid_size, vq.depth)
            )

        @unittest.skip(
            "the images' tokenizer is a conv autoencoder whose spatial attention runs through SDPA and "
            "returns no weights; image features have no transformer layers to report attentions of"
        )
        def test_get_image_features_attentions(self):
            pass

        @unittest.skip(
            "the source distribution ships no tests/generation/test_utils.py, so GenerationTesterMixin "
            "cannot be inherited; UniCodeGenerationTest checks generation instead"
        )
        def test_generation_tester_mixin_inheritance(self):
            pass

    class UniCodeVisualTokenizerTester:
        """A standalone visual tokenizer (it stores its codebook) on 16 px images."""

        def __init__(self, parent=None, batch_size=3):
            self.parent = parent
            self.batch_size = batch_size
            self.is_training = True
            self.image_size = 16
            self.num_hidden_layers = 0  # no transformer layers

        def get_config(self) -> UniCodeVisualTokenizerConfig:
            return UniCodeVisualTokenizerConfig(
                image_size=self.image_size,
                base_channels=8,
                channel_multipliers=[1, 2, 2],
                z_channels=8,
                quantizer="rq",
                depth=2,
                codebook_size=32,
                code_dim=32,
            )

        def prepare_config_and_inputs_for_common(self):
            pixel_values = torch.rand(self.batch_size, 3, self.image_size, self.image_size) * 2 - 1
            return self.get_config(), {"pixel_values": pixel_values}

    class UniCodeVisualTokenizerTest(common.ModelTesterMixin, unittest.TestCase):
        all_model_classes = (UniCodeVisualTokenizer,)
        has_attentions = False  # its spatial attention runs through SDPA and returns no weights
        test_resize_embeddings = False  # no token embeddings: the codebook is LLM rows, resized with the LLM

        def setUp(self):
            self.model_tester = UniCodeVisualTokenizerTester(self)

        @unittest.skip("an image autoencoder has no token embeddings: its codebook is rows of an LLM's table")
        def test_model_get_set_embeddings(self):
            pass

        @unittest.skip(
            "its hidden states are conv feature maps (batch, channels, height, width), not the "
            "(sequence, hidden) per-layer states this test measures; tests/test_visual_tokenizer.py checks them"
        )
        def test_hidden_states_output(self):
            pass


class UniCodeGenerationTest(unittest.TestCase):
    """What `GenerationTesterMixin` checks, for the text loop of `UniCodeForConditionalGeneration` with images in the
    prompt: greedy decoding is the forward's argmax step by step, beams and padding see the right image, and the
    dict output carries scores, logits and a cache that continues the sequence."""

    def setUp(self):
        torch.manual_seed(0)
        self.model_tester = UniCodeModelTester(self, batch_size=2)
        config, self.inputs = self.model_tester.prepare_config_and_inputs_for_common()
        self.model = UniCodeForConditionalGeneration(config).eval()
        self.span = self.model.image_span_logits_processor()

    def generate(self, inputs, **kwargs):
        return self.model.generate(**inputs, do_sample=False, max_new_tokens=4, pad_token_id=0, **kwargs)

    def row(self, index: int) -> dict:
        return {key: value[index : index + 1] for key, value in self.inputs.items()}

    def test_greedy_generation_is_the_forward_argmax_at_every_step(self):
        inputs = self.row(0)
        generated = self.generate(inputs)
        ids = inputs["input_ids"]
        with torch.no_grad():
            for _ in range(generated.shape[1] - ids.shape[1]):
                logits = self.model(input_ids=ids, pixel_values=inputs["pixel_values"]).logits[:, -1]
                ids = torch.cat([ids, self.span(ids, logits).argmax(-1, keepdim=True)], dim=1)
        self.assertTrue(torch.equal(generated, ids))

    def test_a_batch_generates_what_each_row_generates_alone_also_left_padded(self):
        inputs = copy.deepcopy(self.inputs)
        # Row 1 loses its first two text ids to left padding.
        inputs["input_ids"][1, :2] = 0
        inputs["attention_mask"][1, :2] = 0
        batched = self.generate(inputs)
        for index in range(2):
            row = {key: value[index : index + 1] for key, value in inputs.items()}
            keep = row["attention_mask"][0].bool()
            alone = self.generate(
                {**row, "input_ids": row["input_ids"][:, keep], "attention_mask": row["attention_mask"][:, keep]}
            )
            start = int((~keep).sum())
            self.assertTrue(torch.equal(batched[index, start : start + alone.shape[1]], alone[0]), f"row {index}")

    def test_beam_search_expands_each_rows_image_with_its_beams(self):
        batched = self.generate(self.inputs, num_beams=2, num_return_sequences=2)
        self.assertEqual(batched.shape[0], 2 * self.model_tester.batch_size)
        for index in range(self.model_tester.batch_size):
            alone = self.generate(self.row(index), num_beams=2, num_return_sequences=2)
            self.assertTrue(torch.equal(batched[2 * index : 2 * index + 2, : alone.shape[1]], alone), f"row {index}")

    def test_dict_output_has_scores_logits_and_a_cache_that_continues_the_sequence(self):
        inputs = self.row(0)
        out = self.generate(inputs, return_dict_in_generate=True, output_scores=True, output_logits=True)
        new = out.sequences.shape[1] - inputs["input_ids"].shape[1]
        self.assertEqual((len(out.scores), len(out.logits)), (new, new))
        self.assertEqual(out.scores[0].shape, (1, self.model_tester.vocab_size))
        # The cache holds every position but the last token, which the next step feeds.
        self.assertEqual(out.cache.get_seq_length(), out.sequences.shape[1] - 1)
        with torch.no_grad():
            step = self.model(input_ids=out.sequences[:, -1:], cache=out.cache).logits[:, -1]
            full = self.model(input_ids=out.sequences, pixel_values=inputs["pixel_values"]).logits[:, -1]
        torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-5)
