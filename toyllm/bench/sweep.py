"""Naive vs KV-cache (or any modes) over a range of generated lengths: where does the cache start to win?

Without a cache, step t recomputes all t tokens, so generating N tokens costs ~N^2/2 token-forwards; with one, each
step processes one token, so it costs ~N. The sweep measures both at each length, alternating modes as
`run_modes` does, and reports the speedup of each mode over `naive` at each length.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from toyllm.bench.runner import Mode, run_modes, time_generation

DEFAULT_LENGTHS = (16, 32, 64, 128, 256, 512, 1000)
SWEEP_COLUMNS = ("new_tokens", "mode", "total_s_min", "decode_ms_p50", "decode_tok_s_best", "speedup_vs_naive")


def run_sweep(
    modes: Sequence[Mode],
    input_ids: torch.Tensor,
    lengths: Sequence[int] = DEFAULT_LENGTHS,
    warmup: int = 1,
    repeats: int = 1,
    advance: Callable[[str, int], None] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, list[float]]]:
    """Rows (one per mode and length) and, per mode, the per-step latencies of its best run at the longest length.

    `advance(mode, tokens)` is called after every generation with the number of tokens it produced.
    """
    for mode in modes:  # warm up at the shortest length: the point is to load code and caches, not to measure
        for _ in range(warmup):
            time_generation(mode, input_ids, lengths[0])
            if advance is not None:
                advance(mode.name, lengths[0])
    rows: list[dict[str, Any]] = []
    curves: dict[str, list[float]] = {}
    for n in sorted(lengths):

        def advance_n(mode: str, n: int = n) -> None:
            if advance is not None:
                advance(mode, n)

        results, timelines = run_modes(modes, input_ids, n, warmup=0, repeats=repeats, advance=advance_n)
        naive = next((r for r in results if r.mode == "naive"), None)
        for result in results:
            row = result.as_row()
            row["speedup_vs_naive"] = naive.total_s_min / result.total_s_min if naive is not None else None
            rows.append(row)
        if n == max(lengths):
            curves = {name: min(runs, key=lambda t: t.total).decode_latencies() for name, runs in timelines.items()}
    return rows, curves


def kv_never_slower(rows: Sequence[dict[str, Any]], mode: str = "kv") -> bool:
    """The first KV target: at every measured length, `mode` took no longer than naive (speedup >= 1)."""
    return all(r["speedup_vs_naive"] >= 1.0 for r in rows if r["mode"] == mode)
