"""Turning results into what people read: a rich table on the terminal, JSON and CSV files, PNG plots.

Every file carries the machine description, because a number without its machine cannot be compared with anything.
Plots use matplotlib's Agg backend (files only, no display needed), imported when a plot is drawn.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

MACHINE_COLUMNS = ("cpu_model", "cpu_logical_cores", "torch", "torch_threads", "gpu", "load_average_1m")
TEXT_COLUMNS = ("mode", "variant", "op")  # left-aligned; every other column holds numbers


def fmt_bytes(n: float | None) -> str:
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def fmt(x: float | None, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:,.{digits}f}"


Cells = tuple[list[str], list[list[str]]]  # (headers, rows) of one table, already formatted


def default_baseline(rows: Sequence[dict[str, Any]]) -> str | None:
    """What speeds are compared with: transformers if it ran, else our plain KV decoding."""
    names = [r["mode"] for r in rows]
    return "hf" if "hf" in names else ("kv" if "kv" in names else None)


def results_cells(rows: Sequence[dict[str, Any]], baseline: str | None = None) -> tuple[Cells, Cells]:
    """Two tables, one line per mode: speed (with decode speed relative to `baseline`), then memory and checks."""
    base = next((r for r in rows if r["mode"] == baseline), None)
    speed_headers = ["mode", "TTFT ms\nmin / med", "prefill\ntok/s", "decode ms/token\np50 / p90 / p99"]
    speed_headers += ["decode tok/s\nbest / med"] + ([f"vs {baseline}\n(best)"] if base else []) + ["roofline\n(best)"]
    memory_headers = ["mode", "peak RSS or\nCUDA increase", "peak torch\nallocations", "KV cache", "weights\nheld"]
    memory_headers += ["weights read\nper step"]
    memory_headers += ["same tokens\nas kv"]
    speed, memory = [], []
    for r in rows:
        ratio = [f"{r['decode_tok_s_best'] / base['decode_tok_s_best']:.2f}x"] if base else []
        roofline = r.get("roofline_fraction")
        speed.append(
            [
                r["mode"],
                f"{fmt(r['ttft_ms_min'])} / {fmt(r['ttft_ms_median'])}",
                fmt(r["prefill_tok_s_best"], 0),
                f"{fmt(r['decode_ms_p50'])} / {fmt(r['decode_ms_p90'])} / {fmt(r['decode_ms_p99'])}",
                f"{fmt(r['decode_tok_s_best'])} / {fmt(r['decode_tok_s_median'])}",
                *ratio,
                f"{100 * roofline:.0f}%" if roofline is not None else "-",
            ]
        )
        match = r.get("tokens_match")
        memory.append(
            [
                r["mode"],
                fmt_bytes(r["peak_mem_bytes"]),
                fmt_bytes(r.get("peak_alloc_bytes")),
                fmt_bytes(r["kv_cache_bytes"]),
                fmt_bytes(r["model_bytes"]),
                fmt_bytes(r["streamed_bytes"]),
                f"{100 * match:.0f}%" if match is not None else "-",
            ]
        )
    return (speed_headers, speed), (memory_headers, memory)


def rich_table(cells: Cells, title: str) -> Table:
    headers, rows = cells
    table = Table(title=title, title_justify="left")
    for name in headers:
        table.add_column(name, justify="left" if name in TEXT_COLUMNS else "right")
    for row in rows:
        table.add_row(*row)
    return table


def markdown_table(cells: Cells) -> str:
    headers, rows = cells
    lines = ["| " + " | ".join(h.replace("\n", " ") for h in headers) + " |"]
    lines.append("|" + "|".join("---" if h in TEXT_COLUMNS else "---:" for h in headers) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def results_tables(rows: Sequence[dict[str, Any]], title: str, baseline: str | None = None) -> list[Table]:
    speed, memory = results_cells(rows, baseline)
    return [rich_table(speed, title), rich_table(memory, "memory, and greedy tokens compared with kv")]


def simple_cells(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> Cells:
    """Dict rows as a table (floats with 4 significant digits), for the smaller reports."""
    headers = list(columns) if columns is not None else list(rows[0]) if rows else []
    return headers, [[_cell(r.get(c)) for c in headers] for r in rows]


def simple_table(rows: Sequence[dict[str, Any]], title: str, columns: Sequence[str] | None = None) -> Table:
    return rich_table(simple_cells(rows, columns), title)


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


# -- files ------------------------------------------------------------------------------------------------------


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n", encoding="utf-8")
    return path


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def write_markdown(path: Path, sections: Sequence[tuple[str, Cells]], machine: dict[str, Any]) -> Path:
    """The tables as Markdown (for BENCHMARKS.md), each under its title, after one line naming the machine."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = f"Machine: {_subtitle(machine)}, {machine.get('torch_threads')} torch threads, load average "
    text += f"{machine.get('load_average_1m')} at the start.\n"
    for title, cells in sections:
        text += f"\n**{title}**\n\n{markdown_table(cells)}\n"
    path.write_text(text, encoding="utf-8")
    return path


def write_csv(path: Path, rows: Sequence[dict[str, Any]], machine: dict[str, Any]) -> Path:
    """One line per row, with the machine's main facts repeated as the last columns (a CSV has no header block)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    full = [{**r, **{f"machine_{k}": machine.get(k) for k in MACHINE_COLUMNS}} for r in rows]
    fields = list(dict.fromkeys(k for r in full for k in r))
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(full)
    return path


# -- plots ------------------------------------------------------------------------------------------------------


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _subtitle(machine: dict[str, Any]) -> str:
    gpu = f", {machine['gpu']}" if machine.get("gpu") else ""
    return f"{machine.get('cpu_model')} ({machine.get('cpu_logical_cores')} cores{gpu}), torch {machine.get('torch')}"


def plot_percentiles(rows: Sequence[dict[str, Any]], path: Path, machine: dict[str, Any]) -> Path:
    """Grouped bars: decode latency per token at p50, p90 and p99, one group per mode."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows) + 2), 4.5))
    width = 0.27
    for i, (key, label) in enumerate((("decode_ms_p50", "p50"), ("decode_ms_p90", "p90"), ("decode_ms_p99", "p99"))):
        xs = [j + (i - 1) * width for j in range(len(rows))]
        ax.bar(xs, [r[key] for r in rows], width, label=label)
    ax.set_xticks(range(len(rows)), [r["mode"] for r in rows])
    ax.set_yscale("log")  # modes differ by 10x and more; a log axis keeps the fast ones readable
    ax.set_ylabel("ms per token (decode, log scale)")
    ax.set_title(f"Decode latency percentiles\n{_subtitle(machine)}", fontsize=10)
    ax.legend()
    ax.grid(axis="y", alpha=0.3, which="both")
    return _save(fig, plt, path)


def plot_throughput(
    rows: Sequence[dict[str, Any]], path: Path, machine: dict[str, Any], bandwidth: float | None
) -> Path:
    """Bars of decode tokens/s per mode, each with its memory-bandwidth ceiling (bandwidth / bytes read per step)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows) + 2), 4.5))
    xs = range(len(rows))
    bars = ax.bar(xs, [r["decode_tok_s_best"] for r in rows], 0.6, label="measured (best run)")
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    if bandwidth:
        ceilings = [bandwidth / r["streamed_bytes"] * r["batch_size"] for r in rows]
        ax.scatter(xs, ceilings, marker="_", s=900, color="black", label="roofline: bandwidth / bytes per step")
    ax.set_xticks(list(xs), [r["mode"] for r in rows])
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"Decode throughput against the memory roofline\n{_subtitle(machine)}", fontsize=10)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, plt, path)


def plot_sweep(rows: Sequence[dict[str, Any]], out_dir: Path, machine: dict[str, Any]) -> list[Path]:
    """Total time vs generated length per mode, and the speedup of each mode over naive vs length."""
    plt = _pyplot()
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode in modes:
        pts = sorted((r["new_tokens"], r["total_s_min"]) for r in rows if r["mode"] == mode)
        ax.plot(*zip(*pts, strict=True), marker="o", label=mode)
    _length_axis(ax, rows)
    ax.set_yscale("log")
    ax.set_xlabel("generated tokens")
    ax.set_ylabel("seconds to generate them (min over repeats)")
    ax.set_title(f"Generation time vs length\n{_subtitle(machine)}", fontsize=10)
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    paths.append(_save(fig, plt, out_dir / "sweep_latency.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode in modes:
        pts = sorted((r["new_tokens"], r["speedup_vs_naive"]) for r in rows if r["mode"] == mode and mode != "naive")
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=f"{mode} over naive")
    ax.axhline(1.0, color="gray", lw=1, ls="--")
    _length_axis(ax, rows)
    ax.set_xlabel("generated tokens")
    ax.set_ylabel("speedup (naive time / mode time)")
    ax.set_title(f"What the KV cache buys, by length\n{_subtitle(machine)}", fontsize=10)
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    paths.append(_save(fig, plt, out_dir / "sweep_speedup.png"))
    return paths


def _length_axis(ax: Any, rows: Sequence[dict[str, Any]]) -> None:
    """A log axis of generated lengths, ticked at the measured lengths and labelled with plain numbers."""
    lengths = sorted({r["new_tokens"] for r in rows})
    ax.set_xscale("log")
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.minorticks_off()


def plot_step_latency(curves: dict[str, list[float]], path: Path, machine: dict[str, Any]) -> Path:
    """Latency of each decode step vs its position: flat with a cache, growing without one."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode, latencies in curves.items():
        ax.plot(range(1, len(latencies) + 1), [1e3 * x for x in latencies], lw=1, label=mode)
    ax.set_xlabel("decode step (tokens generated so far)")
    ax.set_ylabel("ms for this step")
    ax.set_yscale("log")
    ax.set_title(f"Per-step latency along one long generation\n{_subtitle(machine)}", fontsize=10)
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    return _save(fig, plt, path)


def _save(fig: Any, plt: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
