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
    """`auto` picks CUDA when present; asking for CUDA without it is a clear error, not a crash later."""
    if isinstance(name, torch.device):
        return name
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidArgumentError(
            f"device '{name}' requested but CUDA is not available on this machine; use --device cpu or auto"
        )
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise InvalidArgumentError(f"unknown device '{name}'; use auto, cpu or cuda") from exc


def resolve_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise InvalidArgumentError(f"unknown dtype '{name}'; choose float32, bfloat16 or float16") from None
