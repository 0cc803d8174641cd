"""Back a model's large weights with 2 MB transparent huge pages (Linux), so decoding spends less time on page walks.

Why: decoding reads every weight once per token, so the CPU walks through the whole model each step. Each memory page
it touches needs an entry in the TLB, the cache of virtual-to-physical translations. With 4 KB pages the second-level
TLB (a few thousand entries) covers only about 8 MB, far less than a model, so a new page every 4 KB costs a page walk
that competes with the weights for memory. One 2 MB huge page covers 512 small ones. In interleaved A/Bs on the
reference machine (`toyllm bench kernel --huge-pages`, docs/cpu_kernel.md), a pass of the kernel over the same
weights in huge pages took 0.80 to 0.95 of the time with one row of activations, and 0.87 to 0.89 with 5 or 9.

Linux gives an allocation huge pages when the system setting allows it (`always`, or `madvise` plus an madvise call
on the range, which is what this module makes). Elsewhere `use_huge_pages` changes nothing.
"""

from __future__ import annotations

import ctypes
import itertools
import sys
from pathlib import Path

import torch
from torch import nn

HUGE_PAGE = 2 << 20  # bytes: x86-64's transparent huge page
MADV_HUGEPAGE = 14  # from <sys/mman.h>
_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def setting() -> str | None:
    """The system's transparent huge page mode (`always`, `madvise` or `never`), or None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        text = _SETTING.read_text()
    except OSError:
        return None
    return text[text.find("[") + 1 : text.find("]")] if "[" in text else None


def available() -> bool:
    """Whether this system grants transparent huge pages to a range that asks for them."""
    return setting() in ("always", "madvise")


def _huge_copy(tensor: torch.Tensor) -> torch.Tensor | None:
    """A copy of `tensor` whose whole 2 MB pages are marked for huge pages; None where madvise refuses."""
    nbytes = tensor.numel() * tensor.element_size()
    buffer = torch.empty(nbytes + HUGE_PAGE, dtype=torch.uint8)  # room to start at a 2 MB boundary
    start = -buffer.data_ptr() % HUGE_PAGE  # offset of the first boundary; the bytes before it are never touched
    whole = nbytes // HUGE_PAGE * HUGE_PAGE  # only whole huge pages: the tail stays in 4 KB pages, nothing is wasted
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.madvise(ctypes.c_void_p(buffer.data_ptr() + start), ctypes.c_size_t(whole), MADV_HUGEPAGE) != 0:
        return None
    copy = buffer[start : start + nbytes].view(tensor.dtype).view(tensor.shape)
    copy.copy_(tensor)  # the first write faults the pages in: now as huge pages
    return copy


@torch.no_grad()
def use_huge_pages(model: nn.Module, min_bytes: int = HUGE_PAGE) -> int:
    """Move every contiguous CPU parameter and buffer (int8 weights are buffers) of at least `min_bytes` into
    huge-page memory, in place; return the bytes moved.

    The tensor objects stay the same (only `.data` changes), so tied weights stay tied and an optimizer built
    earlier still holds them. Returns 0 where huge pages are unavailable.
    """
    if not available():
        return 0
    moved = 0
    for param in itertools.chain(model.parameters(), model.buffers()):  # each shared tensor once
        nbytes = param.numel() * param.element_size()
        if param.device.type != "cpu" or nbytes < min_bytes or not param.is_contiguous():
            continue
        if param.data_ptr() % HUGE_PAGE == 0:  # moved already (a self-speculative draft shares the target's layers)
            continue
        copy = _huge_copy(param.data)
        if copy is None:
            return moved
        param.data = copy
        moved += nbytes
    return moved
