"""What the tests of toyllm's CPU kernel share: when to skip them, and a record of the kernel's calls."""

from __future__ import annotations

from typing import Any

import pytest
from torch.utils._python_dispatch import TorchDispatchMode

from toyllm import kernels

# Skipped only where the kernel is not meant to exist; on a supported machine a failed build fails the tests.
needs_kernel = pytest.mark.skipif(
    kernels._why_not_supported() is not None, reason=f"no CPU kernel here: {kernels._why_not_supported()}"
)


class KernelCalls(TorchDispatchMode):
    """Inside `with KernelCalls() as calls:`, `calls.rows` lists the rows of x of every call of the kernel's operator
    (torch.ops.toyllm.gemv, or amx_linear), in order: proof that a product went through the kernel, not torch's
    matmul. `calls.attention` lists the new tokens of every `toyllm::cached_attention` call."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[int] = []
        self.attention: list[int] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func.namespace == "toyllm" and func._opname in ("gemv", "amx_linear"):  # products, not argmax_rows
            self.rows.append(int(args[0].shape[0]))
        if func.namespace == "toyllm" and func._opname == "cached_attention":
            self.attention.append(int(args[0].shape[1]))
        return func(*args, **(kwargs or {}))
