"""Named presets: YAML files under `configuration/`, found in a source checkout or installed.

`configuration/` is data, not a package (PyPI has a different top-level `configuration`), so
`setup.py` installs it under `<prefix>/share/unicode-mllm/configuration`.
"""

from __future__ import annotations

import sys
import sysconfig
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from modeling_unicode import UniCodeVisualTokenizerConfig
from modeling_unicode.configuration_unicode import check_visual_input


def configuration_dir() -> Path:
    """The `configuration/` folder: beside this package in a checkout (also editable installs),
    else under the install prefix."""
    candidates = [Path(__file__).resolve().parent.parent / "configuration"]
    for prefix in {sys.prefix, sysconfig.get_path("data")}:
        candidates.append(Path(prefix) / "share" / "unicode-mllm" / "configuration")
    for candidate in candidates:
        if (candidate / "models").is_dir():
            return candidate
    raise FileNotFoundError(
        "configuration/ not found in " + ", ".join(map(str, candidates)) + "; reinstall unicode-mllm"
    )


def list_presets(kind: str = "models") -> list[str]:
    return sorted(p.stem for p in (configuration_dir() / kind).glob("*.yaml"))


def load_preset(name: str, kind: str = "models") -> dict[str, Any]:
    """The preset `name` of `kind` (`models`, later `recipes`, `accelerate`) as a dict."""
    path = configuration_dir() / kind / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"preset={name!r} is not a {kind} preset; choose one of {list_presets(kind)}")
    with open(path, encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def load_recipe(name: str) -> dict[str, Any]:
    """The training recipe of preset `name` (`configuration/recipes/<name>.yaml`); raises naming the recipes."""
    return load_preset(name, "recipes") or {}


def recipe_settings(arguments_class, sections: list[dict], overrides: dict) -> tuple[dict, dict]:
    """The fields of the dataclass `arguments_class` that the recipe `sections` set (later sections win), then the
    caller's `overrides` (None means "the recipe's"). Returns (settings, the overrides that were given); an
    override that is no field raises, naming the fields. Each stage's `from_recipe` builds its arguments here."""
    names = {f.name for f in fields(arguments_class)}
    settings = {k: v for section in sections for k, v in (section or {}).items() if k in names}
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(given) - names)
    if unknown:
        raise TypeError(
            f"{arguments_class.__name__}.from_recipe got unknown settings {unknown}; the fields are {sorted(names)}"
        )
    return {**settings, **given}, given


def preset_visual_input(preset: str | dict) -> str:
    """How an input image enters the LLM in a model preset (its `visual_input`; without one the paper's
    "aggregate"): `UniCodeConfig.visual_input` of the MLLM assembled from it."""
    data = load_preset(preset) if isinstance(preset, str) else preset
    return check_visual_input(data.get("visual_input", "aggregate"), "the model preset's visual_input")


def vision_tokenizer_config(preset: str | dict, **overrides):
    """`UniCodeVisualTokenizerConfig` of a model preset (by name or as loaded), with overrides."""
    data = load_preset(preset) if isinstance(preset, str) else preset
    return UniCodeVisualTokenizerConfig(**{**data["vision_tokenizer"], **overrides})
