"""Where a model runs: the device rule shared by training and inference, and the autocast dtype that
goes with the device."""

from __future__ import annotations

import torch

from moevlm.errors import ConfigError


def resolve_device(name: str, key: str = "train.device") -> torch.device:
    """``auto``: CUDA, else Apple's MPS, else the CPU. A named device this machine lacks is refused
    (``key`` names the setting in the message)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{key} {name!r}: expected auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key} {name}: this machine has no CUDA device (auto picks what it has)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{key} {name}: this machine has no Apple MPS device (auto picks what it has)")
    return device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 when asked for, or with ``auto`` on a device whose kernels support it (a CUDA card that
    has bf16; MPS from macOS 14); None: fp32."""
    if precision == "bf16":
        return torch.bfloat16
    if precision != "auto":
        return None
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device.type == "mps" and torch.backends.mps.is_macos_or_newer(14, 0):
        return torch.bfloat16
    return None
