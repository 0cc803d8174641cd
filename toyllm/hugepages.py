"""Back a model's large weights with 2 MB transparent huge pages (Linux), so decoding spends less time on page walks.

Why: decoding reads every weight once per token, so the CPU walks through the whole model each step. Each memory page
it touches needs an entry in the TLB, the cache of virtual-to-physical translations. With 4 KB pages the second-level
TLB (a few thousand entries) covers only about 8 MB, far less than a model, so a new page every 4 KB costs a page walk
that competes with the weights for memory. One 2 MB huge page covers 512 small ones. In interleaved A/Bs on the
reference machine (`toyllm bench kernel --huge-pages`, docs/cpu_kernel.md), a pass of the kernel over the same
weights in huge pages took 0.80 to 0.96 of the time with one row of activations, and 0.87 to 0.95 with 5 or 9.

Linux gives an allocation huge pages when the system setting allows it (`always`, or `madvise` plus an madvise call
on the range, which is what this module makes) and it has free 2 MB blocks; `huge_page_bytes` says how much it gave.
Elsewhere, or with `TOYLLM_HUGEPAGES=0`, `use_huge_pages` changes nothing.

A moved tensor is a view into a buffer 2 MB larger than itself (room to start at a 2 MB boundary). safetensors
checkpoints (`save_pretrained`) store only the tensor; `torch.save` and `copy.deepcopy` would copy the whole buffer.
"""

from __future__ import annotations

import ctypes
import itertools
import mmap
import os
import sys
import weakref
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

HUGE_PAGE = 2 << 20  # bytes: x86-64's transparent huge page
MADV_HUGEPAGE, MADV_NOHUGEPAGE = 14, 15  # from <sys/mman.h>
_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")
UNAVAILABLE = "{what} needs Linux transparent huge pages set to 'always' or 'madvise', and TOYLLM_HUGEPAGES not 0"
# Tensors already moved, by id (a self-speculative draft shares the target's layers, so they come twice). Weak
# values: an entry goes when its tensor does, so a reused id never matches a dead tensor.
_moved: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()


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
    """Whether this system grants transparent huge pages to a range that asks for them (and toyllm may ask)."""
    return os.environ.get("TOYLLM_HUGEPAGES", "1") != "0" and setting() in ("always", "madvise")


def _madvise(address: int, length: int, advice: int) -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.madvise(ctypes.c_void_p(address), ctypes.c_size_t(length), advice) == 0


def aligned_copy(tensor: torch.Tensor, huge: bool = True) -> torch.Tensor | None:
    """A copy of `tensor` starting at a 2 MB boundary, its whole 2 MB pages advised for huge pages (or, with
    `huge=False`, against them: the 4 KB side of an A/B); None where madvise refuses."""
    nbytes = tensor.nbytes
    # A fresh private anonymous mapping, not torch.empty: malloc may hand back memory that earlier work already
    # faulted in (as 4 KB or as huge pages), and madvise does not change pages that already exist. (Private: shared
    # anonymous memory follows another setting, shmem_enabled.) The tensor keeps the mapping alive; it is unmapped
    # when the last view of it goes. 2 MB more than needed: room to start at a 2 MB boundary.
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buffer = torch.frombuffer(region, dtype=torch.uint8)
    start = -buffer.data_ptr() % HUGE_PAGE  # offset of the first boundary; the bytes before it are never touched
    whole = nbytes // HUGE_PAGE * HUGE_PAGE  # only whole huge pages: the tail stays in 4 KB pages, nothing is wasted
    if not _madvise(buffer.data_ptr() + start, whole, MADV_HUGEPAGE if huge else MADV_NOHUGEPAGE):
        return None
    copy = buffer[start : start + nbytes].view(tensor.dtype).view(tensor.shape)
    copy.copy_(tensor)  # the first write faults the pages in, as huge pages where the system has free 2 MB blocks
    return copy


@torch.no_grad()
def use_huge_pages(model: nn.Module) -> int:
    """Move every contiguous CPU parameter and buffer (int8 weights are buffers) that spans at least one whole
    huge page into huge-page memory, in place; return the bytes moved.

    The tensor objects stay the same (only `.data` changes), so tied weights stay tied and an optimizer built
    earlier still holds them. Returns 0 where huge pages are unavailable.
    """
    if not available():
        return 0
    moved = 0
    with torch.inference_mode(False):  # called under inference_mode, the copies would be inference-only tensors
        for tensor in itertools.chain(model.parameters(), model.buffers()):  # each shared tensor once
            if tensor.device.type != "cpu" or tensor.nbytes < HUGE_PAGE or not tensor.is_contiguous():
                continue
            if _moved.get(id(tensor)) is tensor:
                continue
            copy = aligned_copy(tensor.data)
            if copy is None:
                return moved
            tensor.data = copy
            _moved[id(tensor)] = tensor
            moved += tensor.nbytes
    return moved


def huge_page_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of huge pages backing the memory mappings that hold `tensors` (/proc/self/smaps `AnonHugePages`).

    Why: madvise only asks. Linux falls back to 4 KB pages without a word when it has no free 2 MB blocks, so a
    measurement that claims huge pages should check that it got them. 0 off Linux.
    """
    pointers = [t.data_ptr() for t in tensors]
    return sum(
        int(fields.get("AnonHugePages", "0").split()[0]) * 1024
        for begin, end, fields in mappings()
        if any(begin <= ptr < end for ptr in pointers)
    )


def mappings() -> Iterator[tuple[int, int, dict[str, str]]]:
    """This process's memory mappings from /proc/self/smaps: (start, end, {field: value}) each; none off Linux."""
    try:
        lines = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return
    current: tuple[int, int, dict[str, str]] | None = None
    for line in lines:
        head = line.split(maxsplit=1)[0] if line else ""
        if "-" in head and ":" not in head:  # a mapping's first line: "start-end perms offset ..."
            if current is not None:
                yield current
            begin, end = (int(x, 16) for x in head.split("-"))
            current = (begin, end, {})
        elif current is not None and ":" in line:  # "AnonHugePages:  4096 kB", "VmFlags: rd wr mr ..."
            key, _, value = line.partition(":")
            current[2][key] = value.strip()
    if current is not None:
        yield current
