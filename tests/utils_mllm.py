"""Tiny UniCode MLLMs for the MLLM/processor/generation tests: a word-level tokenizer whose ~300
filler words serve as visual codes, a 1-layer Llama and a 16 px visual tokenizer."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from modeling_unicode import (
    UniCodeForConditionalGeneration,
    UniCodeImageProcessor,
    UniCodeProcessor,
    UniCodeVisualTokenizer,
    UniCodeVisualTokenizerConfig,
    add_image_special_tokens,
    embedding_rows,
    select_codebook_rows,
)

WORDS = (
    "a an the of is what color shape image generate based on this description user assistant system "
    "red green blue yellow circle square triangle big small left right and there in picture describe"
).split()
PUNCTUATION = list(":.,'?!\"")
NUM_FILLER = 300
CODEBOOK_SIZE = 256
HIDDEN = 32


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(["<pad>", "<s>", "</s>", "<unk>"])}
    for word in WORDS + PUNCTUATION + [f"w{i}" for i in range(NUM_FILLER)]:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def tiny_llm(vocab_size: int, seed: int = 0, tie: bool = False, max_positions: int = 512) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def vq_config(quantizer: str = "rq", depth: int = 2, codebook_token_ids=None) -> UniCodeVisualTokenizerConfig:
    # 16 px, 3 stages -> 4x4 latent grid: vq 16 codes, rq 4x4x2 = 32, hq 2x2x5 = 20.
    return UniCodeVisualTokenizerConfig(
        image_size=16,
        base_channels=8,
        channel_multipliers=[1, 2, 2],
        z_channels=8,
        quantizer=quantizer,
        depth=depth,
        codebook_size=CODEBOOK_SIZE,
        code_dim=HIDDEN,
        codebook_token_ids=codebook_token_ids,
    )


def tiny_parts(quantizer: str = "rq", tie: bool = False, max_positions: int = 512, seed: int = 0):
    """(llm, tokenizer, standalone visual tokenizer) whose codebook equals the LLM rows, as after stage I."""
    tokenizer = tiny_tokenizer()
    add_image_special_tokens(tokenizer)
    llm = tiny_llm(len(tokenizer), seed=seed, tie=tie, max_positions=max_positions)
    ids, _ = select_codebook_rows(llm.get_input_embeddings().weight, CODEBOOK_SIZE, tokenizer=tokenizer)
    torch.manual_seed(seed + 1)
    vision = UniCodeVisualTokenizer(vq_config(quantizer, codebook_token_ids=ids)).eval()
    with torch.no_grad():
        vision.codebook.copy_(embedding_rows(llm.get_input_embeddings(), torch.tensor(ids)))
    return llm, tokenizer, vision


def tiny_mllm(quantizer: str = "rq", visual_input: str = "aggregate", **kwargs):
    """(model, processor) of a random-init UniCode MLLM."""
    llm, tokenizer, vision = tiny_parts(quantizer, **kwargs)
    model = UniCodeForConditionalGeneration.from_pretrained_parts(
        llm, tokenizer, vision, visual_input=visual_input
    ).eval()
    processor = UniCodeProcessor.from_model_config(model.config, tokenizer, UniCodeImageProcessor(size=16))
    return model, processor


def random_images(n: int = 2, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1
