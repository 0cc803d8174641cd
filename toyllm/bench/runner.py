"""Timing one generation token by token, and turning repeated timings into the reported metrics.

Every mode (toyllm/bench/modes.py) generates through a callback `on_tokens(block)` called as soon as each block of
new tokens exists, (B, n) with n = 1 except for speculative decoding. `time_generation` stamps each call (after a
CUDA synchronize, so GPU times are real), which gives, from one run:

    time to first token  = first stamp - start         (the prefill, plus one sampling step)
    decode latencies     = gaps between later stamps   (a block of n tokens counts as n tokens of gap / n)
    decode tokens/s      = B * tokens after the first / (last stamp - first stamp)

Modes are run alternately (`run_modes`) so that a machine busy with other work slows every mode alike: on a shared
machine only ratios measured side by side mean anything.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from toyllm.bench.memory import PeakMemory, trace_allocations

OnTokens = Callable[[torch.Tensor], None]


class Mode(Protocol):
    """A way of generating: plain KV decoding, no cache, int8, transformers... (see toyllm/bench/modes.py)."""

    name: str
    model_bytes: int  # bytes of every weight it holds
    streamed_bytes: int  # weight bytes read by one decode step (embedding tables are only gathered from)

    def run(self, input_ids: torch.Tensor, max_new_tokens: int, on_tokens: OnTokens) -> None: ...

    def kv_cache_bytes(self, batch_size: int, total_len: int) -> int: ...


@dataclass
class Timeline:
    """One timed generation."""

    start: float
    stamps: list[float]  # perf_counter when each block of tokens was ready
    block_sizes: list[int]  # tokens per row in each block
    tokens: torch.Tensor  # (B, N) the generated tokens, on the CPU
    peak_bytes: int

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def ttft(self) -> float:
        return self.stamps[0] - self.start

    @property
    def total(self) -> float:
        return self.stamps[-1] - self.start

    def decode_latencies(self) -> list[float]:
        """Seconds per token (per row) after the first block; a block of n tokens gives n equal entries."""
        out: list[float] = []
        for prev, now, n in zip(self.stamps, self.stamps[1:], self.block_sizes[1:], strict=False):
            out += [(now - prev) / n] * n
        return out

    def decode_tokens_per_s(self) -> float:
        seconds = self.stamps[-1] - self.stamps[0]
        return self.batch_size * sum(self.block_sizes[1:]) / seconds if seconds > 0 else float("nan")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_generation(mode: Mode, input_ids: torch.Tensor, max_new_tokens: int) -> Timeline:
    """Run `mode` once, stamping every block of new tokens; the peak memory is measured around the whole run."""
    device = input_ids.device
    stamps: list[float] = []
    sizes: list[int] = []
    blocks: list[torch.Tensor] = []

    def on_tokens(block: torch.Tensor) -> None:
        sync(device)
        stamps.append(time.perf_counter())
        sizes.append(block.shape[1])
        blocks.append(block)

    sync(device)
    with PeakMemory(device) as peak:
        start = time.perf_counter()
        mode.run(input_ids, max_new_tokens, on_tokens)
    if not stamps:
        raise RuntimeError(f"mode {mode.name} produced no tokens")
    tokens = torch.cat(blocks, dim=1).cpu()  # after timing: the hot loop only appends to a list
    return Timeline(start, stamps, sizes, tokens, peak.bytes)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation, as numpy's default."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass
class ModeResult:
    """Everything reported for one mode: min and median over the repeats, percentiles over all decode steps."""

    mode: str
    batch_size: int
    prompt_len: int
    new_tokens: int
    repeats: int
    ttft_ms_min: float
    ttft_ms_median: float
    prefill_tok_s_best: float
    prefill_tok_s_median: float
    decode_ms_p50: float
    decode_ms_p90: float
    decode_ms_p99: float
    decode_tok_s_best: float
    decode_tok_s_median: float
    total_s_min: float
    total_s_median: float
    peak_mem_bytes: int
    kv_cache_bytes: int
    model_bytes: int
    streamed_bytes: int
    warmup_s: float  # the first warm-up run: includes compilation for compiled modes
    peak_alloc_bytes: int | None = None  # most bytes torch held during one (untimed, traced) run, above the start
    tokens_match: float | None = None  # fraction of tokens equal to the reference mode's (greedy decoding)
    roofline_fraction: float | None = None  # streamed bytes x decode steps/s / measured bandwidth
    extra: dict[str, Any] = field(default_factory=dict)

    def as_row(self) -> dict[str, Any]:
        row = {k: v for k, v in self.__dict__.items() if k != "extra"}
        row.update(self.extra)
        return row


def summarize(mode: Mode, timelines: list[Timeline], prompt_len: int, warmup_s: float) -> ModeResult:
    B = timelines[0].batch_size
    ttfts = [t.ttft for t in timelines]
    rates = [t.decode_tokens_per_s() for t in timelines]
    latencies = [x for t in timelines for x in t.decode_latencies()]
    new_tokens = timelines[0].tokens.shape[1]
    return ModeResult(
        mode=mode.name,
        batch_size=B,
        prompt_len=prompt_len,
        new_tokens=new_tokens,
        repeats=len(timelines),
        ttft_ms_min=1e3 * min(ttfts),
        ttft_ms_median=1e3 * statistics.median(ttfts),
        prefill_tok_s_best=B * prompt_len / min(ttfts),
        prefill_tok_s_median=B * prompt_len / statistics.median(ttfts),
        decode_ms_p50=1e3 * percentile(latencies, 50),
        decode_ms_p90=1e3 * percentile(latencies, 90),
        decode_ms_p99=1e3 * percentile(latencies, 99),
        decode_tok_s_best=max(rates),
        decode_tok_s_median=statistics.median(rates),
        total_s_min=min(t.total for t in timelines),
        total_s_median=statistics.median(t.total for t in timelines),
        peak_mem_bytes=int(statistics.median(t.peak_bytes for t in timelines)),
        kv_cache_bytes=mode.kv_cache_bytes(B, prompt_len + new_tokens),
        model_bytes=mode.model_bytes,
        streamed_bytes=mode.streamed_bytes,
        warmup_s=warmup_s,
    )


def run_modes(
    modes: Sequence[Mode],
    input_ids: torch.Tensor,
    max_new_tokens: int,
    warmup: int = 1,
    repeats: int = 3,
    advance: Callable[[str], None] | None = None,
) -> tuple[list[ModeResult], dict[str, list[Timeline]]]:
    """Warm every mode up, then time `repeats` rounds in which every mode runs once, in a rotating order.

    `advance(mode_name)` is called after every run (warm-ups included), for a progress bar.
    """
    warmup_s: dict[str, float] = {}
    for mode in modes:
        for i in range(warmup):
            timeline = time_generation(mode, input_ids, max_new_tokens)
            if i == 0:
                warmup_s[mode.name] = timeline.total
            if advance is not None:
                advance(mode.name)
    timelines: dict[str, list[Timeline]] = {mode.name: [] for mode in modes}
    for r in range(repeats):
        shift = r % len(modes)
        for mode in list(modes[shift:]) + list(modes[:shift]):  # rotate: no mode always runs first
            timelines[mode.name].append(time_generation(mode, input_ids, max_new_tokens))
            if advance is not None:
                advance(mode.name)
    prompt_len = input_ids.shape[1]
    results = [summarize(m, timelines[m.name], prompt_len, warmup_s.get(m.name, float("nan"))) for m in modes]
    return results, timelines


def traced_peak_bytes(mode: Mode, input_ids: torch.Tensor, max_new_tokens: int) -> int:
    """Peak bytes that torch's allocator held during one more run of `mode`, above what it held before.

    RSS cannot see this on a CPU: after the first run, freed memory stays in the process and is reused, so the RSS of
    later runs does not grow even though they allocate a cache and activations. The allocator's own events can.
    """
    trace = trace_allocations(lambda: mode.run(input_ids, max_new_tokens, lambda block: None), input_ids.device)
    return trace.peak_bytes


def token_agreement(tokens: torch.Tensor, reference: torch.Tensor) -> float:
    """The fraction of generated positions where two greedy runs agree (1.0: the same text)."""
    n = min(tokens.shape[1], reference.shape[1])
    return float((tokens[:, :n] == reference[:, :n]).float().mean())
