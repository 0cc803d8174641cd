"""Two ways to measure memory, for two questions.

`PeakMemory` answers "how much more memory did this run need?" the way a user sees it: the CUDA allocator's peak
on GPU, the process's resident set size (RSS) on CPU, sampled from a thread because the OS keeps no per-interval
peak. RSS includes everything (allocator caching, library buffers), so it is honest but coarse.

`trace_allocations` answers "how many bytes did torch itself hold at its peak, and how many times did it allocate?"
exactly, from the profiler's allocation events. That is what the chunked-prefill target (activation memory) and the
per-step allocation check (no cache tensors allocated while decoding) need, on any device.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psutil
import torch
from torch.profiler import ProfilerActivity, profile


class PeakMemory:
    """`with PeakMemory(device) as peak: ...` then `peak.bytes` is the peak increase over the starting point."""

    def __init__(self, device: torch.device | str = "cpu", interval_s: float = 0.001) -> None:
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            self._process = psutil.Process()
            self._start = self._peak = self._process.memory_info().rss
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._peak = max(self._peak, self._process.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._start
            return
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self._peak = max(self._peak, self._process.memory_info().rss)
        self.bytes = max(0, self._peak - self._start)


@dataclass
class AllocationTrace:
    peak_bytes: int  # the most bytes torch held at once above what it held before, on the traced device
    allocated_bytes: int  # sum of every allocation (memory traffic through the allocator)
    allocations: int
    largest_bytes: int  # the biggest single allocation


@contextmanager
def _profiled(device: torch.device) -> Iterator[Any]:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, profile_memory=True) as prof:
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
