"""Export a trained run folder as a self-contained Hub repository folder.

The folder loads with `from_pretrained(folder_or_repo, trust_remote_code=True)` on a machine that
has never seen this repository: the `modeling_unicode` files travel flat beside the weights and
every Auto class finds them through `auto_map`.

    folder/
      config.json (+ auto_map)  model*.safetensors  generation_config.json
      processor_config.json (+ auto_map)  tokenizer.json  tokenizer_config.json  chat_template.jinja
      configuration_unicode.py  modeling_unicode.py  ...   (remote code, copied unchanged)
      vision_tokenizer/         (the standalone visual tokenizer, with its own codebook and code)
      README.md  samples.png  report.json
      adapter/                  (optional: the stage-II LoRA adapter alone, PEFT format)
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional, Union

import modeling_unicode
from modeling_unicode import UniCodeForConditionalGeneration, UniCodeProcessor, UniCodeVisualTokenizer

from .model_card import build_model_card, describe_llm, is_repo_id
from .run_folder import REPORT_FILE, SAMPLES_FILE, RunFolder, check_run_folder

CODE_DIR = Path(modeling_unicode.__file__).parent
# The diffusers pipeline is not remote code: it would make loading the model depend on diffusers.
REMOTE_CODE_FILES = (
    "configuration_unicode.py",
    "quantization_unicode.py",
    "modeling_unicode_vq.py",
    "modeling_unicode.py",
    "image_processing_unicode.py",
    "processing_unicode.py",
)
VISION_TOKENIZER_CODE_FILES = ("configuration_unicode.py", "quantization_unicode.py", "modeling_unicode_vq.py")
# register_for_auto_class keeps one Auto class per class, but the MLLM answers four; so the maps are
# written out in full.
AUTO_MAP = {
    "AutoConfig": "configuration_unicode.UniCodeConfig",
    "AutoModel": "modeling_unicode.UniCodeModel",
    "AutoModelForCausalLM": "modeling_unicode.UniCodeForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_unicode.UniCodeForConditionalGeneration",
    "AutoModelForMultimodalLM": "modeling_unicode.UniCodeForConditionalGeneration",
    "AutoProcessor": "processing_unicode.UniCodeProcessor",
    "AutoImageProcessor": "image_processing_unicode.UniCodeImageProcessor",
}
VISION_TOKENIZER_AUTO_MAP = {
    "AutoConfig": "configuration_unicode.UniCodeVisualTokenizerConfig",
    "AutoModel": "modeling_unicode_vq.UniCodeVisualTokenizer",
}
VISION_TOKENIZER_DIR = "vision_tokenizer"
ADAPTER_DIR = "adapter"
# What remote code may import: the Hub user's environment has transformers and its dependencies only.
ALLOWED_REMOTE_IMPORTS = {"torch", "transformers", "numpy", "PIL", "safetensors"}


def check_remote_code(files=REMOTE_CODE_FILES, code_dir: Path = CODE_DIR) -> None:
    """Refuse to ship code that would not import on a bare machine: only the allowed packages, the
    standard library, and siblings through `from .x import y` (the remote-code loader follows no
    other form)."""
    problems = []
    for name in files:
        tree = ast.parse((code_dir / name).read_text(encoding="utf-8"), filename=name)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    sibling = (node.module or "").split(".")[0]
                    if f"{sibling}.py" not in files:
                        problems.append(f"{name} imports .{sibling}, which is not shipped")
                    continue
                roots = [node.module.split(".")[0]]
            else:
                continue
            for root in roots:
                if root not in ALLOWED_REMOTE_IMPORTS and root not in sys.stdlib_module_names and root != "__future__":
                    problems.append(f"{name} imports {root}")
    if problems:
        raise ValueError(
            "the model code cannot ship as Hub remote code: "
            + "; ".join(problems)
            + f". Remote code may import only {sorted(ALLOWED_REMOTE_IMPORTS)}, the standard library and "
            "its siblings as `from .x import y`"
        )


def standalone_visual_tokenizer(model: UniCodeForConditionalGeneration) -> UniCodeVisualTokenizer:
    """The MLLM's visual tokenizer as a standalone model that stores its own codebook: the LLM's
    embedding rows of `codebook_token_ids`, so it encodes exactly as the MLLM does."""
    inner = model.model._require_vision("exporting the visual tokenizer")
    config = inner.config.__class__.from_dict(inner.config.to_dict())
    config.store_codebook = True
    standalone = UniCodeVisualTokenizer(config).to(inner.dtype)
    state = dict(inner.state_dict())
    state["codebook"] = model.model.codebook().detach().to(inner.dtype)
    standalone.load_state_dict(state)
    return standalone.eval()


def _copy_code(files, target: Path) -> None:
    for name in files:
        shutil.copyfile(CODE_DIR / name, target / name)


def _add_auto_map(path: Path, auto_map: dict, nested: Optional[str] = None, nested_map: Optional[dict] = None) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    data["auto_map"] = auto_map
    if nested is not None and isinstance(data.get(nested), dict):
        data[nested]["auto_map"] = nested_map
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def add_remote_code(folder: Union[str, os.PathLike]) -> Path:
    """Make a saved MLLM folder (model + processor) load with `trust_remote_code=True` alone, on a machine
    without this package: the model code beside the weights and `auto_map` in its configs. Run folders get it
    too (`training.sft.save_mllm`), so their `mllm/` loads without `import modeling_unicode`."""
    folder = Path(folder)
    _add_auto_map(folder / "config.json", AUTO_MAP)
    if (folder / "processor_config.json").is_file():
        _add_auto_map(
            folder / "processor_config.json",
            {"AutoProcessor": AUTO_MAP["AutoProcessor"]},
            nested="image_processor",
            nested_map={"AutoImageProcessor": AUTO_MAP["AutoImageProcessor"]},
        )
    _copy_code(REMOTE_CODE_FILES, folder)
    return folder


def _prepare_target(out_dir: Path, overwrite: bool) -> Path:
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(
            f"out_dir {str(out_dir)!r} is a file, not a folder; choose a folder (--overwrite never deletes a file)"
        )
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ValueError(
            f"out_dir {str(out_dir)!r} exists and is not empty; choose a new folder or pass overwrite=True "
            "(--overwrite)"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target and renamed at the end: an interrupted export leaves no half folder.
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))


def _finish(staging: Path, out_dir: Path) -> Path:
    # mkdtemp's folder is private (0700), and some writers leave 0600 files: an export is for sharing, so every
    # file and folder gets the modes the user's umask gives a new one.
    umask = os.umask(0)
    os.umask(umask)
    for folder, _, files in os.walk(staging):
        os.chmod(folder, 0o777 & ~umask)
        for file in files:
            os.chmod(os.path.join(folder, file), 0o666 & ~umask)
    if out_dir.is_dir():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)
    return out_dir


def _model_card(run: RunFolder, model, repo_id, name, base_model, base_model_license, samples: bool):
    vq = model.config.vq_config
    return build_model_card(
        run.report,
        repo_id=repo_id,
        name=name,
        base_model=base_model,
        llm=describe_llm(model),
        base_model_license=base_model_license,
        samples_file="samples.png" if samples else None,
        quantizer=vq.quantizer,
        image_size=vq.image_size,
        tokens_per_image=model.config.image_tokens_per_generation,
    )


def export_run(
    run_dir: Union[str, os.PathLike],
    out_dir: Union[str, os.PathLike],
    *,
    max_shard_size: Union[int, str] = "5GB",
    repo_id: Optional[str] = None,
    base_model: Optional[str] = None,
    base_model_license: Optional[str] = None,
    include_adapter: bool = False,
    overwrite: bool = False,
) -> Path:
    """Export the run folder `run_dir` into the Hub repository folder `out_dir` and return it.

    Args:
        max_shard_size: safetensors shards above this size (`"5GB"`, `"200MB"` or bytes).
        repo_id: the repository the card's title and usage snippets name (default: `out_dir`'s name).
        base_model / base_model_license: the base LLM's Hub id and licence, over what the report's settings say;
            without one the card describes the LLM by architecture and size.
        include_adapter: also copy the run's PEFT LoRA adapter into `adapter/`.
        overwrite: replace a non-empty `out_dir`.

    Raises:
        ValueError: `run_dir` is not a trained run (each missing piece named), `out_dir` is not empty,
            or the model code could not ship as remote code.
    """
    run = check_run_folder(run_dir)
    out_dir = Path(out_dir)
    if out_dir.resolve() == run.path.resolve() or run.path.resolve() in out_dir.resolve().parents:
        raise ValueError(f"out_dir {str(out_dir)!r} lies inside the run folder; export to a separate folder")
    check_remote_code()
    check_remote_code(VISION_TOKENIZER_CODE_FILES)
    adapter = run.adapter() if include_adapter else None
    model = UniCodeForConditionalGeneration.from_pretrained(run.mllm).eval()
    processor = UniCodeProcessor.from_pretrained(run.mllm)
    staging = _prepare_target(out_dir, overwrite)
    try:
        model.save_pretrained(staging, max_shard_size=max_shard_size)
        processor.save_pretrained(staging)
        add_remote_code(staging)

        vision = standalone_visual_tokenizer(model)
        vision.config.auto_map = dict(VISION_TOKENIZER_AUTO_MAP)
        vision.save_pretrained(staging / VISION_TOKENIZER_DIR, max_shard_size=max_shard_size)
        # The loader looks for a subfolder's code inside that subfolder.
        _copy_code(VISION_TOKENIZER_CODE_FILES, staging / VISION_TOKENIZER_DIR)

        if adapter is not None:
            (staging / ADAPTER_DIR).mkdir()
            for name in ("adapter_config.json", "adapter_model.safetensors"):
                shutil.copyfile(adapter / name, staging / ADAPTER_DIR / name)
        shutil.copyfile(run.samples, staging / SAMPLES_FILE)
        shutil.copyfile(run.report_path, staging / REPORT_FILE)
        _model_card(run, model, repo_id, out_dir.name, base_model, base_model_license, samples=True).save(
            staging / "README.md"
        )
        if any(staging.rglob("*.bin")) or any(staging.rglob("*.pt")):
            raise ValueError("the export holds pickled weights (.bin/.pt); weights must be safetensors only")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return _finish(staging, out_dir)


def export_adapter(
    run_dir: Union[str, os.PathLike],
    out_dir: Union[str, os.PathLike],
    *,
    overwrite: bool = False,
) -> Path:
    """Export only the run's stage-II LoRA adapter (PEFT format: `adapter_config.json` +
    `adapter_model.safetensors`) with a model card, for users who already hold the base MLLM."""
    run = check_run_folder(run_dir)
    adapter = run.adapter()
    config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    if not isinstance(config, dict) or "peft_type" not in config:
        raise ValueError(f"{adapter / 'adapter_config.json'} has no peft_type; it is not a PEFT adapter config")
    out_dir = Path(out_dir)
    staging = _prepare_target(out_dir, overwrite)
    try:
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copyfile(adapter / name, staging / name)
        shutil.copyfile(run.samples, staging / SAMPLES_FILE)
        shutil.copyfile(run.report_path, staging / REPORT_FILE)
        model_config = json.loads((run.mllm / "config.json").read_text(encoding="utf-8"))
        vq = model_config.get("vq_config") or {}
        base = config.get("base_model_name_or_path")
        card = build_model_card(
            run.report,
            name=out_dir.name,
            base_model=base if is_repo_id(base) else None,
            samples_file="samples.png",
            quantizer=vq.get("quantizer"),
            image_size=vq.get("image_size"),
        )
        card.data.tags = sorted(set(card.data.tags or []) | {"peft", "lora"})
        card.data.library_name = "peft"
        card.save(staging / "README.md")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return _finish(staging, out_dir)


__all__ = [
    "export_run",
    "export_adapter",
    "add_remote_code",
    "standalone_visual_tokenizer",
    "check_remote_code",
    "AUTO_MAP",
    "REMOTE_CODE_FILES",
    "VISION_TOKENIZER_AUTO_MAP",
]
