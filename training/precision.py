"""Whether a run trains under bf16 autocast: the one place a recipe's `bf16: auto` is decided.

bf16 autocast (float32 master weights) pays only where the hardware multiplies bf16 natively: CUDA GPUs that support
it, and CPUs with AVX512-BF16 or AMX-BF16 (Sapphire Rapids and later, Zen 4 and later). Elsewhere PyTorch emulates
every bf16 product in float32 arithmetic plus conversions, and every stage's step is several times slower than in
plain float32 (docs/results.md, "Precision by what the CPU multiplies"). So the recipes ask for `auto`, and `true` /
`false` still force either way.
"""

from __future__ import annotations

import torch

AUTO = "auto"


def cpu_multiplies_bf16() -> bool:
    """True when this CPU has bf16 dot-product instructions (AVX512-BF16 or AMX-BF16)."""
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    if capabilities is None:  # an older torch that cannot say: keep the float32 that always runs at full speed
        return False
    found = capabilities()
    return bool(found.get("avx512_bf16") or found.get("amx_bf16"))


def use_bf16(setting: bool | str, device: str | torch.device | None = None) -> bool:
    """Resolve a `bf16` setting (True, False or "auto") for `device` (default: CUDA when available, else the CPU).

    "auto" is True where bf16 is multiplied natively (see the module docstring), False elsewhere.
    """
    if isinstance(setting, bool):
        return setting
    if setting != AUTO:
        raise ValueError(f"bf16 must be true, false or {AUTO!r}, got {setting!r}")
    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if kind == "cpu":
        return cpu_multiplies_bf16()
    return False
