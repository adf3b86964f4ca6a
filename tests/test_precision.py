"""`bf16: auto`: bf16 autocast only where the hardware multiplies bf16, float32 elsewhere."""

import pytest
import torch

from training import precision
from training.precision import use_bf16
from training.presets import load_recipe
from training.sft import sft_uses_bf16, unicode_sft_config


@pytest.fixture
def cpu_capabilities(monkeypatch):
    """Stand in for this CPU's capability report, with CUDA hidden, so both kinds of CPU can be tested anywhere."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def set_capabilities(**flags):
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: dict(flags))

    return set_capabilities


@pytest.mark.parametrize(
    "flags, expected",
    [
        ({"avx512_bf16": True, "amx_bf16": False}, True),
        ({"avx512_bf16": False, "amx_bf16": True}, True),
        ({"avx512_bf16": False, "amx_bf16": False, "avx512_f": True}, False),
        ({}, False),
    ],
)
def test_auto_turns_bf16_on_only_on_cpus_with_bf16_instructions(cpu_capabilities, flags, expected, tmp_path):
    cpu_capabilities(**flags)
    assert use_bf16("auto") is expected
    assert use_bf16("auto", "cpu") is expected
    assert unicode_sft_config(tmp_path, bf16="auto").bf16 is expected


def test_true_and_false_are_kept_whatever_the_cpu(cpu_capabilities, tmp_path):
    cpu_capabilities()
    assert use_bf16(True) is True
    assert use_bf16(False) is False
    assert unicode_sft_config(tmp_path, bf16=True).bf16 is True
    cpu_capabilities(avx512_bf16=True)
    assert use_bf16(False) is False


def test_a_torch_that_cannot_report_its_cpu_trains_in_float32(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delattr(torch.cpu, "get_capabilities")
    assert precision.cpu_multiplies_bf16() is False
    assert use_bf16("auto") is False


@pytest.mark.parametrize("setting", ["yes", "bf16", 1, None])
def test_a_setting_other_than_true_false_or_auto_is_refused_naming_the_three(setting):
    with pytest.raises(ValueError, match="bf16 must be true, false or 'auto'"):
        use_bf16(setting)


@pytest.mark.parametrize("preset", ["tiny", "small", "base", "gemma-270m"])
def test_every_recipe_leaves_the_precision_to_the_hardware(preset):
    recipe = load_recipe(preset)
    sections = [recipe.get("stage0") or {}, recipe["stage1"], (recipe.get("stage2") or {}).get("trainer") or {}]
    settings = [section["bf16"] for section in sections if "bf16" in section]
    assert "bf16" in recipe["stage1"] and all(setting == "auto" for setting in settings), settings


@pytest.mark.parametrize("flags", [{"avx512_bf16": True}, {}])
@pytest.mark.parametrize("overrides", [{}, {"bf16": "auto"}, {"bf16": True}, {"bf16": False}, {"use_cpu": True}])
def test_rehearsal_is_told_the_precision_the_sft_trainer_trains_in(cpu_capabilities, tmp_path, flags, overrides):
    """Self-rehearsal samples in `sft_uses_bf16`'s precision: it must be the SFTConfig's own."""
    cpu_capabilities(**flags)
    assert sft_uses_bf16(overrides) is unicode_sft_config(tmp_path, **overrides).bf16
