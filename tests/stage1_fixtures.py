"""A tiny causal LM folder (untrained) and small images, for stage-I tests."""

from pathlib import Path

import torch

from training.text_lm import llama_config, train_text_tokenizer

HIDDEN = 32


def make_tiny_llm(folder: Path, vocab_size: int = 600) -> Path:
    if (folder / "config.json").is_file():
        return folder
    texts = [
        f"the {c} {s} is at the {p}"
        for c in ("red", "green", "blue")
        for s in ("circle", "square")
        for p in ("top", "left")
    ]
    from training.text_lm import stdlib_docstrings

    tokenizer = train_text_tokenizer(stdlib_docstrings()[:400] + texts, vocab_size)
    torch.manual_seed(0)
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(
        llama_config(
            {"hidden_size": HIDDEN, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2},
            tokenizer,
        )
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_overrides(**extra):
    """A 16-px tokenizer small enough for a test to train in seconds."""
    return {
        "image_size": 16,
        "base_channels": 8,
        "channel_multipliers": [1, 2],
        "z_channels": 8,
        "code_dim": HIDDEN,
        **extra,
    }


def tiny_images(n: int = 32, size: int = 16, seed: int = 0) -> torch.Tensor:
    """uint8 (n, 3, size, size): blocky random colour images, learnable at once."""
    generator = torch.Generator().manual_seed(seed)
    cells = (torch.rand(n, 3, 4, 4, generator=generator) * 255).byte()
    return cells.repeat_interleave(size // 4, 2).repeat_interleave(size // 4, 3)
