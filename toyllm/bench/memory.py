"""Two ways to measure memory, for two questions.

`PeakMemory` answers "how much more memory did this run need?" the way a user sees it: the CUDA allocator's peak
on GPU, the process's peak resident set size (RSS) on CPU. Linux keeps that peak itself (VmHWM) and lets a process
reset it (`/proc/self/clear_refs`), so nothing runs beside the timed code. (An earlier version sampled RSS from a
thread every millisecond; on a 2-core machine that thread took CPU time and the GIL from the run it was measuring.)
RSS includes everything (allocator caching, library buffers), so it is honest but coarse: after a warm-up run the
allocator reuses its memory and the increase can read close to zero.

`trace_allocations` answers "how many bytes did torch itself hold at its peak, and how many times did it allocate?"
exactly, from the profiler's allocation events. That is what the chunked-prefill target (activation memory) and the
per-step allocation check (no cache tensors allocated while decoding) need, on any device.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from typing import Any

import psutil
import torch
from torch.profiler import ProfilerActivity, profile


class PeakMemory:
    """`with PeakMemory(device) as peak: ...` then `peak.bytes` is the peak increase over the starting point."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.bytes = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            self._process = psutil.Process()
            self._start = self._process.memory_info().rss
            self._hwm = _reset_peak_rss()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._start
            return
        end = self._process.memory_info().rss
        peak = _peak_rss() if self._hwm else None
        self.bytes = max(0, (peak if peak is not None else end) - self._start)


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _peak_rss() is not None
    except OSError:
        return False


def _peak_rss() -> int | None:
    """VmHWM from /proc/self/status in bytes: the most resident memory since the last reset."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    return None


@dataclass
class AllocationTrace:
    peak_bytes: int  # the most bytes torch held at once above what it held before, on the traced device
    allocated_bytes: int  # sum of every allocation (memory traffic through the allocator)
    allocations: int
    largest_bytes: int  # the biggest single allocation


@contextmanager
def _c_stderr_hidden() -> Iterator[None]:
    """Hide what C++ code writes to file descriptor 2 meanwhile: torch's profiler prints 'USDT ... profiler_start'
    and '... profiler_stop' lines (and an allocator warning) when it starts and stops, which no setting turns off."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


@contextmanager
def quiet_profile(**kwargs: Any) -> Iterator[Any]:
    """`torch.profiler.profile(**kwargs)` without its start and stop lines on stderr (the workload's stay visible)."""
    prof = profile(**kwargs)
    with _c_stderr_hidden():
        prof.start()
    try:
        yield prof
    finally:
        with _c_stderr_hidden():
            prof.stop()


@cache  # once per process: the first call spends the warning, later calls do nothing
def _spend_the_unknown_block_warning() -> None:
    """Free, under a throwaway memory profile with stderr hidden, a block allocated before it started.

    Why: torch prints "Memory block of unknown size was allocated before the profiling started" from C++ on the
    first such free a memory profile sees, then on every 1000th (a workload freeing the model's earlier tensors is
    enough). It says nothing about the measurement: those frees are left out by design (`trace_allocations` counts
    what the workload allocates). Spending the first here keeps it off a bench's stderr without hiding anything
    else; a run would need a thousand more such frees to see it again.
    """
    block = torch.empty(64)
    with _c_stderr_hidden():
        prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        prof.start()
        del block
        prof.stop()


@contextmanager
def _profiled(device: torch.device) -> Iterator[Any]:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _spend_the_unknown_block_warning()
    with quiet_profile(activities=activities, profile_memory=True) as prof:
        yield prof


def trace_allocations(fn: Callable[[], object], device: torch.device | str = "cpu") -> AllocationTrace:
    """Run `fn` under the profiler and replay its allocation events (+bytes) and frees (-bytes) in time order."""
    device = torch.device(device)
    with _profiled(device) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    events = [
        e
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type().name == ("CUDA" if device.type == "cuda" else "CPU")
    ]
    events.sort(key=lambda e: e.start_ns())
    held = peak = total = count = largest = 0
    for e in events:
        n = e.nbytes()
        held += n
        peak = max(peak, held)
        if n > 0:
            total += n
            count += 1
            largest = max(largest, n)
    return AllocationTrace(peak_bytes=peak, allocated_bytes=total, allocations=count, largest_bytes=largest)
