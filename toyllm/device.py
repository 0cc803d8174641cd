"""Device and dtype selection, resolved when asked for (never at import time)."""

from __future__ import annotations

import torch

from toyllm.errors import InvalidArgumentError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "16": torch.float16,
}


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """`auto` picks CUDA when present; asking for CUDA without it is a clear error, not a crash later.

    Only cpu and cuda[:N] are accepted: torch knows other types (meta, mps, xpu, ...) that toyllm never runs on,
    and they would fail later with an error far from the --device that caused it. A torch.device passed in from
    Python is trusted as is.
    """
    if isinstance(name, torch.device):
        return name
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise InvalidArgumentError(f"unknown device '{name}'; choose auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError(
            f"device '{name}' requested but CUDA is not available on this machine; use --device cpu or auto"
        )
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise InvalidArgumentError(f"device '{name}' requested but this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def resolve_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise InvalidArgumentError(f"unknown dtype '{name}'; choose float32, bfloat16 or float16") from None
