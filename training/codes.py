"""Code datasets: image datasets tokenized ONCE into columns of vocabulary ids.

Stage II never runs the visual tokenizer's encoder per step: `encode_image_dataset` maps an image
column to a `codes` column (the flattened ĥ·ŵ·D code map, `flatten_code_map` order) and drops the
pixels. The dataset carries a signature of the tokenizer that made it (K, grid, depth, quantizer and
a hash of the codebook ids and weights) in `dataset.info.description`, so codes made by a different
visual tokenizer are refused by `check_code_dataset` instead of silently training on wrong ids.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional

import datasets
import numpy as np
import torch

from modeling_unicode import UniCodeForConditionalGeneration, UniCodeVisualTokenizer, flatten_code_map

from .checkpointing import atomic_directory, is_complete
from .stage1 import images_to_uint8, to_pixel_values

CODES_COLUMN = "codes"
_SIGNATURE_KEY = "unicode_code_signature"


def _visual_tokenizer(encoder):
    """(visual tokenizer, codebook tensor or None) of a standalone tokenizer or an MLLM."""

    if isinstance(encoder, UniCodeVisualTokenizer):
        return encoder, None
    base = getattr(encoder, "get_base_model", lambda: encoder)()
    if isinstance(base, UniCodeForConditionalGeneration):
        return base.model._require_vision("encoding images"), base.model.codebook
    raise TypeError(
        f"encoder must be a UniCodeVisualTokenizer (<run>/vision_tokenizer) or a UniCodeForConditionalGeneration, "
        f"got {type(encoder).__name__}"
    )


def code_signature(encoder) -> dict[str, Any]:
    """What a code column depends on: K, layout and a hash of the ids and of the weights that map
    pixels to ids (encoder, projection, codebook). Two tokenizers with the same signature give the
    same codes."""
    tokenizer, codebook_fn = _visual_tokenizer(encoder)
    config = tokenizer.config
    ids = [int(i) for i in config.codebook_token_ids]
    digest = hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes())
    ids_hash = digest.hexdigest()[:16]
    # The decoder does not affect the codes; hashing only the encoder side keeps a
    # decoder-only fine-tune from invalidating the cache.
    for name, tensor in sorted(tokenizer.state_dict().items()):
        if name.startswith("decoder") or name.startswith("post_quant") or name == "codebook":
            continue
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    codebook = codebook_fn() if codebook_fn is not None else tokenizer.codebook
    if codebook is not None:
        digest.update(codebook.detach().float().cpu().numpy().tobytes())
    return {
        "codebook_size": len(ids),
        "codebook_ids_sha256": ids_hash,
        "grid_size": int(config.code_grid_size),
        "depth": int(config.depth),
        "quantizer": config.quantizer,
        "tokens_per_image": int(config.tokens_per_image),
        "image_size": int(config.image_size),
        "tokenizer_sha256": digest.hexdigest()[:32],
    }


def dataset_signature(dataset) -> Optional[dict[str, Any]]:
    try:
        return json.loads(dataset.info.description or "{}").get(_SIGNATURE_KEY)
    except (json.JSONDecodeError, AttributeError):
        return None


def _set_signature(dataset, signature: dict) -> None:
    try:
        info = json.loads(dataset.info.description or "{}")
        if not isinstance(info, dict):
            info = {"description": dataset.info.description}
    except json.JSONDecodeError:
        info = {"description": dataset.info.description}
    info[_SIGNATURE_KEY] = signature
    dataset.info.description = json.dumps(info)


def _pixels(images, image_size: int, argument: str, image_processor=None) -> torch.Tensor:
    return to_pixel_values(images_to_uint8(images, image_size, argument, image_processor))


@torch.no_grad()
def encode_image_dataset(
    dataset,
    encoder,
    image_column: str = "image",
    batch_size: int = 64,
    keep_image: bool = False,
    desc: str = "tokenizing images",
    image_processor=None,
):
    """`dataset` with a `codes` column (list of ĥ·ŵ·D ints per row) from `encoder`'s visual tokenizer.

    Images of any size and mode are brought to the tokenizer's resolution by `image_processor` (the model's
    `processor.image_processor`; default: `UniCodeImageProcessor` at that size), as at inference.

    Batched `datasets.map` with a progress bar; the fingerprint includes the tokenizer signature, so
    a dataset backed by cache files is encoded once per tokenizer (`save_code_dataset` caches the
    in-memory ones in the run folder). The image column is dropped unless `keep_image=True`.
    """

    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(f"dataset must be a datasets.Dataset, got {type(dataset).__name__}")
    if image_column not in dataset.column_names:
        raise ValueError(
            f"dataset has no {image_column!r} column (columns: {dataset.column_names}); pass image_column= the column "
            "holding the images"
        )
    tokenizer, codebook_fn = _visual_tokenizer(encoder)
    signature = code_signature(encoder)
    size = signature["image_size"]
    device = next(tokenizer.parameters()).device
    dtype = next(tokenizer.parameters()).dtype

    def encode(batch):
        pixels = _pixels(batch[image_column], size, f"dataset[{image_column!r}]", image_processor).to(device, dtype)
        codebook = codebook_fn() if codebook_fn is not None else None
        codes = tokenizer.encode(pixels, codebook=codebook) if codebook is not None else tokenizer.encode(pixels)
        flat = flatten_code_map(codes).to(torch.int32).cpu().numpy()
        return {CODES_COLUMN: [row.tolist() for row in flat]}

    fingerprint = hashlib.sha256(
        f"{dataset._fingerprint}|{image_column}|{keep_image}|{json.dumps(signature, sort_keys=True)}|"
        f"{image_processor.to_json_string() if image_processor is not None else ''}".encode()
    ).hexdigest()[:32]
    features = dataset.features.copy()
    if not keep_image:
        del features[image_column]
    features[CODES_COLUMN] = datasets.List(datasets.Value("int32"))
    was_training = tokenizer.training
    tokenizer.eval()
    try:
        out = dataset.map(
            encode,
            batched=True,
            batch_size=batch_size,
            remove_columns=[] if keep_image else [image_column],
            features=features,
            new_fingerprint=fingerprint,
            desc=desc,
        )
    finally:
        tokenizer.train(was_training)
    _set_signature(out, signature)
    return out


def check_code_dataset(dataset, expected, argument: str = "dataset") -> None:
    """Refuse a code column that a different visual tokenizer made.

    `expected` is a signature (`code_signature`), a visual tokenizer or an MLLM. K, the codebook ids
    and the layout must match; the weights hash too when both sides know it.
    """
    if CODES_COLUMN not in dataset.column_names:
        raise ValueError(
            f"{argument} has no {CODES_COLUMN!r} column (columns: {dataset.column_names}); make it with "
            "training.codes.encode_image_dataset(dataset, vision_tokenizer)"
        )
    have = dataset_signature(dataset)
    if have is None:
        raise ValueError(
            f"{argument} carries no visual-tokenizer signature, so its codes cannot be checked against the model; "
            "encode it with training.codes.encode_image_dataset (or load it with load_code_dataset)"
        )
    want = expected if isinstance(expected, dict) else code_signature(expected)
    for key in ("codebook_size", "codebook_ids_sha256", "grid_size", "depth", "quantizer", "tokens_per_image"):
        if have.get(key) != want.get(key):
            raise ValueError(
                f"{argument}'s codes come from a different visual tokenizer: {key}={have.get(key)!r} but the model "
                "has "
                f"{want.get(key)!r}; re-encode the images with this model's tokenizer (delete the cached codes folder)"
            )
    if (
        have.get("tokenizer_sha256")
        and want.get("tokenizer_sha256")
        and have["tokenizer_sha256"] != want["tokenizer_sha256"]
    ):
        raise ValueError(
            f"{argument}'s codes come from a different visual tokenizer (same K and ids, different weights: "
            f"{have['tokenizer_sha256']} vs {want['tokenizer_sha256']}); re-encode the images with this model's "
            "tokenizer"
        )


def save_code_dataset(dataset, folder: str | os.PathLike) -> Path:
    """Save atomically (a crash never leaves a half-written folder that looks finished)."""

    if dataset_signature(dataset) is None:
        raise ValueError("dataset has no visual-tokenizer signature; make it with encode_image_dataset")
    with atomic_directory(folder) as staging:
        dataset.save_to_disk(str(staging))
        (staging / "code_signature.json").write_text(json.dumps(dataset_signature(dataset), indent=2))
    return Path(folder)


def load_code_dataset(folder: str | os.PathLike, expected=None):
    """A saved code dataset; with `expected` (signature, tokenizer or MLLM) its codes are checked."""

    folder = Path(folder)
    if not is_complete(folder):
        raise ValueError(f"{folder} is not a complete code dataset (no COMPLETE marker); rebuild it")
    dataset = datasets.load_from_disk(str(folder))
    if dataset_signature(dataset) is None:
        _set_signature(dataset, json.loads((folder / "code_signature.json").read_text()))
    if expected is not None:
        check_code_dataset(dataset, expected, argument=str(folder))
    return dataset


def cached_code_dataset(folder: str | os.PathLike, build, encoder, **encode_kwargs):
    """The code dataset at `folder` if it exists and matches `encoder`; else `build()` (an image
    dataset) is encoded and saved there. A mismatching cache is rebuilt, not silently reused."""
    folder = Path(folder)
    signature = code_signature(encoder)

    if is_complete(folder):
        saved = json.loads((folder / "code_signature.json").read_text())
        if saved == signature:
            return load_code_dataset(folder, signature)
    dataset = encode_image_dataset(build(), encoder, **encode_kwargs)
    save_code_dataset(dataset, folder)
    return load_code_dataset(folder, signature)


__all__ = [
    "CODES_COLUMN",
    "code_signature",
    "dataset_signature",
    "encode_image_dataset",
    "check_code_dataset",
    "save_code_dataset",
    "load_code_dataset",
    "cached_code_dataset",
]
