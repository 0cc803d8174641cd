"""The matrix-vector kernel on its own: bytes per second against torch, and the cost of more rows.

Two measurements, both on the weight matrices of a real model shape (every Linear of GPT-2 124M by default), read in
the order a decode step reads them, so that the weights stream from memory as they do in a step (they are far
larger than the CPU's caches):

* `formats`: GB/s of weights read with one activation row, for torch's `F.linear` on float32 weights and for
  toyllm's kernel on float32, bfloat16 and int8 weights, next to the read bandwidth measured in the same run.
* `rows`: the time of M rows (M = 1..32) relative to one row, for both. A memory-bound product should cost about
  the same for a few rows as for one: that is what makes speculative verification of K + 1 tokens cheap. Also the
  kernel against torch on the transformer layers alone (`toyllm_vs_torch_layers`): a prefill of M tokens sends M
  rows through the layers but only the last through the output head, which dominates a small model's bytes.

With a baseline (another version of gemv.cpp, `compare_kernels`), the current and baseline kernels are timed
interleaved, pass by pass, on float32 weights for each row count, and each keeps its fastest pass: the A/B by which
changes to the kernel are judged on a noisy machine. `compare_huge_pages` is the same A/B for one kernel on two
copies of the weights, one in 2 MB huge pages (toyllm/hugepages.py) and one in ordinary 4 KB pages.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from toyllm import hugepages, kernels
from toyllm.bench.machine import measure_read_bandwidth
from toyllm.errors import InvalidArgumentError
from toyllm.gpt2.model import GPT2LMHeadModel
from toyllm.quantize import quantize_weight


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _float32_weights(model: GPT2LMHeadModel) -> list[torch.Tensor]:
    """Every Linear weight of `model`, as contiguous float32, in the order a decode step reads them."""
    return [m.weight.detach().float().contiguous() for m in model.modules() if isinstance(m, nn.Linear)]


def _nbytes(weights: list[torch.Tensor]) -> int:
    return sum(w.nbytes for w in weights)


def _activations(weights: list[torch.Tensor], rows: Sequence[int]) -> dict[int, dict[int, torch.Tensor]]:
    """Random x for each row count and each input width: inputs[M][K] is (M, K)."""
    return {m: {k: torch.randn(m, k) for k in {w.shape[1] for w in weights}} for m in rows}


def kernel_bench(
    model: GPT2LMHeadModel, rows: Sequence[int] = (1, 2, 3, 5, 8, 9, 16), repeats: int = 5
) -> dict[str, Any]:
    """Time one pass over every Linear weight of `model` per format and per row count; see the module docstring."""
    if repeats < 1:
        raise InvalidArgumentError(f"--repeats must be >= 1, got {repeats}")
    kernels.require("toyllm bench kernel")
    f32 = _float32_weights(model)
    quantized = [quantize_weight(w) for w in f32]
    formats: dict[str, tuple[list[torch.Tensor], list[torch.Tensor | None]]] = {  # (weights, int8 scales)
        "float32": (f32, [None] * len(f32)),
        "bfloat16": ([w.bfloat16() for w in f32], [None] * len(f32)),
        "int8": ([q for q, _ in quantized], [s for _, s in quantized]),
    }
    inputs = _activations(f32, rows)

    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]  # the order of f32
    head = model.lm_head.weight.data_ptr()
    layers = [i for i, linear in enumerate(linears) if linear.weight.data_ptr() != head]  # all but the output head

    def torch_pass(m: int, only: list[int] | None = None) -> Callable[[], object]:
        chosen = f32 if only is None else [f32[i] for i in only]
        return lambda: [torch.nn.functional.linear(inputs[m][w.shape[1]], w) for w in chosen]

    def kernel_pass(name: str, m: int, only: list[int] | None = None) -> Callable[[], object]:
        weights, scales = formats[name]
        pairs = list(zip(weights, scales, strict=True))
        chosen = pairs if only is None else [pairs[i] for i in only]
        return lambda: [kernels.gemv(inputs[m][w.shape[1]], w, None, s) for w, s in chosen]

    bandwidth = measure_read_bandwidth("cpu")  # before the passes, with the same threads
    with torch.inference_mode():
        passes = [("torch float32", torch_pass(1), _nbytes(f32))]
        passes += [(f"toyllm {name}", kernel_pass(name, 1), _nbytes(formats[name][0])) for name in formats]
        one_row: dict[str, float] = {}
        results: list[dict[str, Any]] = []
        for label, run, nbytes in passes:
            one_row[label] = seconds = _median_seconds(run, repeats)
            results.append({"kernel": label, "ms_per_pass": 1e3 * seconds, "gb_per_s": nbytes / seconds / 1e9})
        by_rows = []
        for m in rows:
            if m == 1:
                continue
            torch_s = _median_seconds(torch_pass(m), repeats)
            ours_s = _median_seconds(kernel_pass("float32", m), repeats)
            torch_layers = _median_seconds(torch_pass(m, layers), repeats)
            ours_layers = _median_seconds(kernel_pass("float32", m, layers), repeats)
            by_rows.append(
                {
                    "rows": m,
                    "torch_float32_vs_1_row": torch_s / one_row["torch float32"],
                    "toyllm_float32_vs_1_row": ours_s / one_row["toyllm float32"],
                    "toyllm_vs_torch": ours_s / torch_s,
                    "toyllm_vs_torch_layers": ours_layers / torch_layers,
                }
            )
    return {
        "weights": sum(w.numel() for w in f32),
        "matrices": len(f32),
        "threads": torch.get_num_threads(),
        "read_bandwidth_gb_s": bandwidth / 1e9,
        "formats": results,
        "rows": by_rows,
    }


def _interleaved(
    variants: dict[str, tuple[Callable[..., torch.Tensor], list[torch.Tensor]]],
    inputs: dict[int, dict[int, torch.Tensor]],
    rows: Sequence[int],
    repeats: int,
) -> dict[tuple[str, int], float]:
    """The fastest pass of each variant (operator, weights) per row count, the variants timed in alternating order."""
    empty = torch.empty(0)
    best = {(name, m): float("inf") for name in variants for m in rows}
    with torch.inference_mode():
        for round_ in range(repeats + 1):  # the first round warms up and is timed too; only the fastest pass counts
            for m in rows:
                order = list(variants.items())
                for name, (op, weights) in order if round_ % 2 else order[::-1]:  # alternate who goes first
                    start = time.perf_counter()
                    for w in weights:
                        op(inputs[m][w.shape[1]], w, empty, empty)
                    best[name, m] = min(best[name, m], time.perf_counter() - start)
    return best


def _ab_rows(best: dict[tuple[str, int], float], a: str, b: str, rows: Sequence[int]) -> list[dict[str, Any]]:
    """Variant `a` against variant `b` per row count, both also relative to b's first row count."""
    one_row = best[b, rows[0]]
    return [
        {
            "rows": m,
            f"{a}_ms": 1e3 * best[a, m],
            f"{b}_ms": 1e3 * best[b, m],
            f"{a}_vs_{b}_1_row": best[a, m] / one_row,
            f"{b}_vs_{b}_1_row": best[b, m] / one_row,
            f"{a}_vs_{b}": best[a, m] / best[b, m],
        }
        for m in rows
    ]


def compare_kernels(
    model: GPT2LMHeadModel, baseline: Callable[..., torch.Tensor], rows: Sequence[int], repeats: int
) -> list[dict[str, Any]]:
    """Current kernel against `baseline` (an operator from `kernels.load_baseline`), interleaved; see the docstring."""
    weights = _float32_weights(model)
    inputs = _activations(weights, rows)
    current = torch.ops.toyllm.gemv
    empty = torch.empty(0)
    for m in rows:  # same numbers first: an A/B of a wrong kernel would mean nothing
        for w in {w.shape: w for w in weights}.values():  # one matrix of each shape
            x = inputs[m][w.shape[1]]
            got, want = baseline(x, w, empty, empty), current(x, w, empty, empty)
            if not torch.allclose(got, want, rtol=1e-4, atol=1e-4 * w.shape[1] ** 0.5):
                raise InvalidArgumentError(f"the baseline kernel's numbers differ from the current kernel's ({m} rows)")
    best = _interleaved({"current": (current, weights), "baseline": (baseline, weights)}, inputs, rows, repeats)
    return _ab_rows(best, "current", "baseline", rows)


def compare_huge_pages(model: GPT2LMHeadModel, rows: Sequence[int], repeats: int) -> dict[str, Any]:
    """The kernel on two 2 MB-aligned copies of the same float32 weights, one advised for 2 MB huge pages and one
    against them (4 KB pages), interleaved. Reports how many bytes of each copy Linux really backed with huge pages.

    Raises a one-line error where the system has no transparent huge pages to give (toyllm/hugepages.py).
    """
    if not hugepages.available():
        raise InvalidArgumentError(hugepages.UNAVAILABLE.format(what="--huge-pages"))
    weights = _float32_weights(model)
    copies = {}
    for side in ("huge", "small"):
        copies[side] = [c for w in weights if (c := hugepages.aligned_copy(w, huge=side == "huge")) is not None]
        if len(copies[side]) < len(weights):
            raise InvalidArgumentError("madvise refused to mark the weights' memory for or against huge pages")
    huge, small = copies["huge"], copies["small"]
    inputs = _activations(weights, rows)
    op = torch.ops.toyllm.gemv
    best = _interleaved({"huge": (op, huge), "small": (op, small)}, inputs, rows, repeats)
    return {
        "setting": hugepages.setting(),
        "weight_bytes": _nbytes(weights),
        "huge_page_bytes": {"huge": hugepages.huge_page_bytes(huge), "small": hugepages.huge_page_bytes(small)},
        "rows": _ab_rows(best, "huge", "small", rows),
    }


def plot_kernel(result: dict[str, Any], path: Any) -> None:
    """Left: GB/s per kernel against the measured bandwidth. Right: cost of M rows relative to one row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    labels = [r["kernel"] for r in result["formats"]]
    left.bar(labels, [r["gb_per_s"] for r in result["formats"]], color=["#999999", "#1f77b4", "#2ca02c", "#d62728"])
    left.axhline(result["read_bandwidth_gb_s"], color="black", linestyle="--", label="measured read bandwidth")
    left.set_ylabel("weight bytes read per second (GB/s)")
    left.set_title("one activation row (decode)")
    left.legend()
    left.tick_params(axis="x", labelrotation=15)
    ms = [1] + [r["rows"] for r in result["rows"]]
    right.plot(ms, [1] + [r["torch_float32_vs_1_row"] for r in result["rows"]], "o-", label="torch F.linear")
    right.plot(ms, [1] + [r["toyllm_float32_vs_1_row"] for r in result["rows"]], "o-", label="toyllm kernel")
    if "baseline" in result:  # the interleaved A/B, both relative to the baseline's one-row pass
        ab = result["baseline"]["rows"]
        ab_rows = [r["rows"] for r in ab]
        right.plot(ab_rows, [r["baseline_vs_baseline_1_row"] for r in ab], "s--", label="baseline (A/B)")
        right.plot(ab_rows, [r["current_vs_baseline_1_row"] for r in ab], "s-", label="current (A/B)")
    if "huge_pages" in result:  # the page-size A/B, both relative to 4 KB pages' one-row pass
        hp = result["huge_pages"]["rows"]
        hp_rows = [r["rows"] for r in hp]
        right.plot(hp_rows, [r["small_vs_small_1_row"] for r in hp], "^--", label="4 KB pages (A/B)")
        right.plot(hp_rows, [r["huge_vs_small_1_row"] for r in hp], "^-", label="2 MB huge pages (A/B)")
    right.set_xlabel("rows M (speculative verification: K + 1)")
    right.set_ylabel("time relative to one row")
    right.set_title("float32, cost of more rows")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
