"""The benchmarks `toyllm bench` runs, as library functions: settings in, a JSON-ready payload out.

`benchmark` compares modes at one shape; `sweep` compares them over generated lengths; `write_*_report` turns a
payload into JSON, CSV and PNG files. The command line (toyllm/cli/bench.py) adds only argument parsing, the
progress bar and the terminal table.

Prompts are random token ids drawn from a seeded generator: speed does not depend on which tokens they are, and
random ids need no tokenizer or text. Weights may be random too (`random:gpt2`): same shapes, same speed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from toyllm.bench.machine import describe_machine, measure_read_bandwidth
from toyllm.bench.modes import ModeOptions, build_modes, parse_modes
from toyllm.bench.report import (
    default_baseline,
    plot_percentiles,
    plot_step_latency,
    plot_sweep,
    plot_throughput,
    results_cells,
    simple_cells,
    write_csv,
    write_json,
    write_markdown,
)
from toyllm.bench.runner import run_modes, token_agreement, traced_peak_bytes
from toyllm.bench.sweep import DEFAULT_LENGTHS, SWEEP_COLUMNS, kv_never_slower, run_sweep
from toyllm.device import resolve_device, resolve_dtype
from toyllm.errors import InvalidArgumentError, check_count
from toyllm.gpt2.model import GPT2LMHeadModel
from toyllm.sampling import validate_seed


@dataclass
class BenchSettings:
    model: str = "random:gpt2"
    modes: Sequence[str] = ("naive", "kv", "hf")
    batch_size: int = 1
    prompt_len: int = 16
    max_new_tokens: int = 128
    warmup: int = 1
    repeats: int = 3
    device: str = "auto"
    dtype: str = "float32"
    seed: int = 0
    threads: int | None = None  # torch CPU threads; None leaves torch's default (one per core)
    draft: str | None = None  # draft model for the speculative mode; None: the target's first layers
    bandwidth_probe_bytes: int = 512 * 2**20  # the tensor summed to measure read bandwidth; 0 skips it

    def validate(self) -> None:
        parse_modes(self.modes)
        for name in ("batch_size", "prompt_len", "max_new_tokens", "repeats"):
            check_count(name.replace("_", "-"), getattr(self, name))
        check_count("warmup", self.warmup, minimum=0)
        if self.threads is not None:
            check_count("--threads", self.threads)
        validate_seed(self.seed)
        resolve_device(self.device)
        resolve_dtype(self.dtype)


def load(settings: BenchSettings) -> tuple[GPT2LMHeadModel, torch.Tensor]:
    """The model (seeded, so `random:` weights repeat) and a seeded random prompt of (batch_size, prompt_len)."""
    settings.validate()
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    device = resolve_device(settings.device)
    torch.manual_seed(settings.seed)
    model = GPT2LMHeadModel.from_pretrained(settings.model, device=device, dtype=resolve_dtype(settings.dtype))
    if settings.prompt_len > model.config.n_positions:
        raise InvalidArgumentError(
            f"prompt-len {settings.prompt_len} exceeds the model's context window of {model.config.n_positions}"
        )
    generator = torch.Generator().manual_seed(settings.seed)
    ids = torch.randint(0, model.config.vocab_size, (settings.batch_size, settings.prompt_len), generator=generator)
    return model, ids.to(device)


def _mode_options(settings: BenchSettings, model: GPT2LMHeadModel) -> ModeOptions:
    draft = None
    if settings.draft is not None:
        param = next(model.parameters())
        draft = GPT2LMHeadModel.from_pretrained(settings.draft, device=param.device, dtype=param.dtype)
    return ModeOptions(draft=draft)


def benchmark(settings: BenchSettings, advance: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every mode at one shape: warm-ups, then `repeats` alternating rounds. Returns the payload for the reports."""
    model, ids = load(settings)
    device = ids.device
    machine = describe_machine(device)
    modes = build_modes(settings.modes, model, _mode_options(settings, model))
    # Bandwidth before and after: the machine's state can change during a long run; the best of both is the ceiling.
    probe = settings.bandwidth_probe_bytes
    bandwidths = [measure_read_bandwidth(device, probe)] if probe else []
    results, timelines = run_modes(modes, ids, settings.max_new_tokens, settings.warmup, settings.repeats, advance)
    if probe:
        bandwidths.append(measure_read_bandwidth(device, probe))
    bandwidth = max(bandwidths) if bandwidths else None
    reference = timelines["kv"][0].tokens if "kv" in timelines else None
    for mode, r in zip(modes, results, strict=True):
        r.peak_alloc_bytes = traced_peak_bytes(mode, ids, settings.max_new_tokens)  # after timing: it slows the run
        if advance is not None:
            advance(mode.name)
        if reference is not None:
            r.tokens_match = token_agreement(timelines[r.mode][0].tokens, reference)
        if bandwidth:
            steps_per_s = r.decode_tok_s_best / r.batch_size
            r.roofline_fraction = r.streamed_bytes * steps_per_s / bandwidth
    return {
        "kind": "run",
        "machine": machine,
        "settings": dataclasses.asdict(settings) | {"modes": list(parse_modes(settings.modes))},
        "model_config": model.config.to_dict(),
        "bandwidth_bytes_per_s": bandwidth,
        "results": [r.as_row() for r in results],
    }


def write_run_report(payload: dict[str, Any], out_dir: str | Path, plots: bool = True) -> list[Path]:
    out = Path(out_dir)
    rows, machine = payload["results"], payload["machine"]
    paths = [write_json(out / "bench.json", payload), write_csv(out / "bench.csv", rows, machine)]
    speed, memory = results_cells(rows, default_baseline(rows))
    paths.append(write_markdown(out / "bench.md", [("speed", speed), ("memory", memory)], machine))
    if plots:
        paths.append(plot_percentiles(rows, out / "percentiles.png", machine))
        paths.append(plot_throughput(rows, out / "throughput.png", machine, payload.get("bandwidth_bytes_per_s")))
    return paths


def sweep(
    settings: BenchSettings, lengths: Sequence[int] = DEFAULT_LENGTHS, advance: Callable[[str, int], None] | None = None
) -> dict[str, Any]:
    """The modes of `settings` (naive and kv by default) at every generated length in `lengths`."""
    if not lengths or min(lengths) < 1:
        raise InvalidArgumentError("lengths must be a non-empty list of positive token counts")
    model, ids = load(settings)
    machine = describe_machine(ids.device)
    modes = build_modes(settings.modes, model, _mode_options(settings, model))
    rows, curves = run_sweep(modes, ids, sorted(set(lengths)), settings.warmup, settings.repeats, advance)
    return {
        "kind": "sweep",
        "machine": machine,
        "settings": dataclasses.asdict(settings) | {"modes": list(parse_modes(settings.modes))},
        "model_config": model.config.to_dict(),
        "lengths": sorted(set(lengths)),
        "kv_never_slower": kv_never_slower(rows) if any(r["mode"] == "naive" for r in rows) else None,
        "results": rows,
        "step_latencies_at_longest": curves,
    }


def write_sweep_report(payload: dict[str, Any], out_dir: str | Path, plots: bool = True) -> list[Path]:
    out = Path(out_dir)
    rows, machine = payload["results"], payload["machine"]
    paths = [write_json(out / "sweep.json", payload), write_csv(out / "sweep.csv", rows, machine)]
    table = simple_cells(rows, SWEEP_COLUMNS)
    paths.append(write_markdown(out / "sweep.md", [("generation time by length", table)], machine))
    if plots:
        paths += plot_sweep(rows, out, machine)
        paths.append(plot_step_latency(payload["step_latencies_at_longest"], out / "sweep_step_latency.png", machine))
    return paths
