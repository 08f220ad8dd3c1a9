"""Speed options: bf16 autocast where the hardware has it, torch.compile, channels-last for CNNs.

bf16 is used only where it is native: on GPUs that report bf16 support, and on CPUs with
AVX-512 BF16 or AMX instructions. On other CPUs PyTorch would emulate it, slower than fp32, so
``precision="auto"`` stays in fp32 there and an explicit ``bf16`` is refused.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch
import torch.nn as nn

from ..errors import VitlabError

PRECISIONS = ("fp32", "bf16", "auto")


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes in bf16 natively."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``fp32`` or ``bf16``: what ``precision`` (``fp32``, ``bf16`` or ``auto``) means on ``device``."""
    if precision not in PRECISIONS:
        raise VitlabError(f"unknown precision '{precision}'; choose one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return "fp32"
    if native_bf16(device):
        return "bf16"
    if precision == "bf16":
        raise VitlabError(f"this {device.type.upper()} has no native bf16 (it would be emulated, slower than fp32); "
                          "use --precision fp32 or auto")
    return "fp32"


def autocast(precision: str, device: torch.device) -> ContextManager:
    """The autocast context of a resolved precision (a no-op for fp32)."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def is_convnet(model: nn.Module) -> bool:
    """Whether most of ``model``'s weights are in convolutions (where channels-last pays)."""
    conv = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d))
    total = sum(p.numel() for p in model.parameters())
    return total > 0 and conv / total > 0.5


def use_channels_last(setting: str, model: nn.Module) -> bool:
    """``channels_last`` setting ``auto`` (on for CNNs), ``on`` or ``off``."""
    if setting not in ("auto", "on", "off"):
        raise VitlabError(f"channels_last must be auto, on or off, not '{setting}'")
    return setting == "on" or (setting == "auto" and is_convnet(model))


def compile_model(model: nn.Module) -> nn.Module:
    """``torch.compile(model)``; a setup torch.compile refuses outright gets one line instead of a trace.

    Compilation itself happens on the first forward pass, so errors of the compiler toolchain
    surface there, not here.
    """
    try:
        return torch.compile(model)
    except Exception as e:  # noqa: BLE001  (the backends raise many kinds)
        raise VitlabError(f"torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                          "run without --compile") from None
