"""`toyllm bench` plumbing on a tiny model: it runs in seconds and writes well-formed JSON, CSV and PNG files.

These tests check structure and correctness (greedy modes agree token for token, chunked prefill gives the same
logits, the cache does not grow by copying), never speed: timings on a shared test machine are noise.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from toyllm.bench.accuracy import compare_to_reference
from toyllm.bench.machine import describe_machine, measure_read_bandwidth
from toyllm.bench.memory import trace_allocations
from toyllm.bench.modes import build_modes, parse_modes, weight_bytes
from toyllm.bench.overhead import step_allocations, twin_model
from toyllm.bench.prefill import chunked_prefill_memory
from toyllm.bench.runner import Timeline, percentile, token_agreement
from toyllm.bench.suite import BenchSettings, benchmark, sweep, write_run_report, write_sweep_report
from toyllm.cli.benchmark.bench_gpt2kv import default_lengths
from toyllm.cli.benchmark.bench_gpt2kv import main as seed_main
from toyllm.cli.main import run_app
from toyllm.errors import InvalidArgumentError
from toyllm.gpt2 import GPT2Config, GPT2LMHeadModel
from toyllm.quantize import quantize_int8

TINY = "random:gpt2-tiny"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ALL_MODES = (
    "naive",
    "kv",
    "onednn",
    "bf16",
    "int8",
    "fp16w",
    "int8-dyn",
    "gemv",
    "gemv-bf16",
    "gemv-int8",
    "gemv-int8+compile",
    "speculative",
    "hf",
)
METRICS = (
    "ttft_ms_min",
    "ttft_ms_median",
    "prefill_tok_s_best",
    "decode_ms_p50",
    "decode_ms_p90",
    "decode_ms_p99",
    "decode_tok_s_best",
    "decode_tok_s_median",
    "peak_mem_bytes",
    "kv_cache_bytes",
    "model_bytes",
    "streamed_bytes",
)


@pytest.fixture(scope="module")
def model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config.from_name("gpt2-tiny")).eval()


@pytest.fixture(scope="module")
def run_payload() -> dict:
    settings = BenchSettings(
        model=TINY, modes=ALL_MODES, max_new_tokens=4, warmup=0, repeats=2, device="cpu", bandwidth_probe_bytes=2**23
    )
    return benchmark(settings)


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 1000, path


# -- the main benchmark ----------------------------------------------------------------------------------------


def test_every_mode_reports_every_metric(run_payload: dict) -> None:
    rows = {r["mode"]: r for r in run_payload["results"]}
    assert list(rows) == list(ALL_MODES)
    for r in rows.values():
        assert r["new_tokens"] == 4 and r["repeats"] == 2 and r["batch_size"] == 1 and r["prompt_len"] == 16
        for key in METRICS:
            assert isinstance(r[key], int | float) and not math.isnan(r[key]) and r[key] >= 0, (r["mode"], key)
        assert r["decode_ms_p50"] <= r["decode_ms_p90"] <= r["decode_ms_p99"]
        assert r["ttft_ms_min"] <= r["ttft_ms_median"] and r["decode_tok_s_best"] >= r["decode_tok_s_median"]
        assert r["roofline_fraction"] > 0
        assert r["peak_alloc_bytes"] > 0
    assert rows["naive"]["kv_cache_bytes"] == 0 < rows["kv"]["kv_cache_bytes"]
    assert rows["bf16"]["kv_cache_bytes"] == rows["kv"]["kv_cache_bytes"] // 2
    assert rows["kv"]["peak_alloc_bytes"] >= rows["kv"]["kv_cache_bytes"]  # the cache is allocated during the run
    for mode, ratio in (
        ("int8", 4),
        ("int8-dyn", 4),
        ("fp16w", 2),
        ("bf16", 2),
        ("gemv-bf16", 2),
        ("gemv-int8", 4),
    ):  # bytes per weight: 4 / ratio
        assert rows[mode]["streamed_bytes"] < 1.1 * rows["kv"]["streamed_bytes"] / ratio, mode
    assert run_payload["bandwidth_bytes_per_s"] > 0


def test_greedy_modes_with_float32_weights_produce_the_same_tokens(run_payload: dict) -> None:
    rows = {r["mode"]: r for r in run_payload["results"]}
    for mode in ("naive", "kv", "onednn", "gemv", "speculative", "hf"):  # same weights and dtype: same argmax
        assert rows[mode]["tokens_match"] == 1.0, mode


def test_run_report_files_are_well_formed(run_payload: dict, tmp_path: Path) -> None:
    paths = write_run_report(run_payload, tmp_path)
    assert {p.name for p in paths} == {"bench.json", "bench.csv", "bench.md", "percentiles.png", "throughput.png"}
    data = json.loads((tmp_path / "bench.json").read_text())
    for key in ("cpu_model", "cpu_logical_cores", "torch", "gpu", "torch_threads"):
        assert key in data["machine"]
    assert data["settings"]["modes"] == list(ALL_MODES) and len(data["results"]) == len(ALL_MODES)
    with (tmp_path / "bench.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["mode"] for r in rows] == list(ALL_MODES)
    assert rows[0]["machine_cpu_model"] == data["machine"]["cpu_model"]
    assert float(rows[1]["decode_tok_s_best"]) > 0
    markdown = (tmp_path / "bench.md").read_text()
    assert markdown.count("| int8-dyn |") == 2 and "| mode | TTFT ms min / med |" in markdown  # speed and memory
    assert_png(tmp_path / "percentiles.png")
    assert_png(tmp_path / "throughput.png")


def test_sweep_reports_speedup_over_naive_at_every_length(tmp_path: Path) -> None:
    settings = BenchSettings(model=TINY, modes=("naive", "kv"), warmup=1, repeats=1, device="cpu")
    payload = sweep(settings, lengths=(4, 2))
    rows = payload["results"]
    assert payload["lengths"] == [2, 4]
    assert [(r["new_tokens"], r["mode"]) for r in rows] == [(2, "naive"), (2, "kv"), (4, "naive"), (4, "kv")]
    assert all(r["speedup_vs_naive"] > 0 for r in rows) and rows[0]["speedup_vs_naive"] == 1.0
    assert isinstance(payload["kv_never_slower"], bool)
    assert set(payload["step_latencies_at_longest"]) == {"naive", "kv"}
    assert len(payload["step_latencies_at_longest"]["kv"]) == 3  # 4 tokens: the first one is the prefill's
    names = {p.name for p in write_sweep_report(payload, tmp_path)}
    plots = {f"sweep_{p}.png" for p in ("latency", "speedup", "step_latency")}
    assert names == {"sweep.json", "sweep.csv", "sweep.md"} | plots
    for name in plots:
        assert_png(tmp_path / name)
    assert json.loads((tmp_path / "sweep.json").read_text())["machine"]["torch"] == torch.__version__


# -- the command line --------------------------------------------------------------------------------------------


def test_cli_writes_table_json_csv_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["bench", "--model", TINY, "--modes", "kv,naive", "-n", "3", "-r", "1", "--warmup", "0"]
    code = run_app(args + ["--device", "cpu", "--seq-len", "20", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    assert "decode tok/s" in out and "naive" in out
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["results"][0]["new_tokens"] == 4  # --seq-len 20 minus the 16-token prompt
    for name in ("bench.csv", "percentiles.png", "throughput.png"):
        assert (tmp_path / name).is_file()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--modes", "kv,warp"], "unknown mode(s) warp"),
        (["--repeats", "0"], "repeats must be in 1..2**63 - 1, got 0"),
        (["--batch-size", str(10**20)], "batch-size must be in 1..2**63 - 1"),  # was an overflow inside torch
        (["--seed", str(10**20)], "seed must be in -2**63..2**64 - 1"),
        (["--threads", str(10**20)], "--threads must be in 1..2**63 - 1"),
        (["--seq-len", "8"], "seq-len (8) must exceed prompt-len (16)"),
    ],
)
def test_cli_mistakes_are_one_line(args: list[str], fragment: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = run_app(["bench", "--model", TINY, "--device", "cpu", *args])
    err = capsys.readouterr().err
    assert code == 2 and fragment in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.strip()]) == 1


def test_seed_script_runs_a_small_sweep(tmp_path: Path) -> None:
    assert default_lengths(1008) == [16, 32, 64, 128, 256, 512, 1008]
    assert default_lengths(10) == [10]
    args = ["--batch_size", "2", "--seq_len", "20", "--model", TINY, "--device", "cpu", "--out", str(tmp_path)]
    assert seed_main(args) == 0
    data = json.loads((tmp_path / "sweep.json").read_text())
    assert data["lengths"] == [4] and data["settings"]["batch_size"] == 2


def test_cli_prefill_overhead_and_profile_write_json(tmp_path: Path) -> None:
    common = ["--model", TINY, "--device", "cpu", "--out", str(tmp_path)]
    assert run_app(["bench", "prefill", "--prompt-len", "64", "--chunk-size", "16", *common]) == 0
    assert run_app(["bench", "overhead", "-n", "4", "-r", "1", *common]) == 0
    assert run_app(["bench", "profile", "--modes", "kv,hf", "--steps", "2", *common]) == 0
    prefill = json.loads((tmp_path / "prefill.json").read_text())["result"]
    assert prefill["prompt_len"] == 64 and prefill["same_argmax"]
    overhead = json.loads((tmp_path / "overhead.json").read_text())
    assert overhead["timing"]["twin_step_ms_p50"] > 0 and overhead["profile"][0]["self_ms_per_step"] > 0
    profiles = json.loads((tmp_path / "profile.json").read_text())["profiles"]
    assert set(profiles) == {"kv", "hf"} and all(0 <= row["share"] <= 1 for row in profiles["hf"])


# -- the measurements ----------------------------------------------------------------------------------------------


def test_chunked_prefill_gives_the_same_logits_with_less_memory(model: GPT2LMHeadModel) -> None:
    result = chunked_prefill_memory(model, prompt_len=256, chunk_size=32)
    assert result["max_abs_logit_diff"] < 1e-4 and result["same_argmax"]
    assert result["chunked_peak_bytes"] < result["one_shot_peak_bytes"]


def test_decode_steps_allocate_no_cache_sized_copies(model: GPT2LMHeadModel) -> None:
    result = step_allocations(model, steps=8)
    assert result["no_cache_growth"], result
    assert result["allocations_per_step"] > 0


def test_twin_model_has_the_same_structure_and_no_width(model: GPT2LMHeadModel) -> None:
    twin = twin_model(model)
    assert twin.config.n_layer == model.config.n_layer and twin.config.n_head == model.config.n_head
    assert twin.num_parameters() < model.num_parameters() / 100


def test_accuracy_of_an_identical_copy_is_perfect_and_int8_is_close(model: GPT2LMHeadModel) -> None:
    tokens = torch.randint(0, model.config.vocab_size, (150,), generator=torch.Generator().manual_seed(0))
    variants = {"copy": copy.deepcopy(model), "int8": quantize_int8(copy.deepcopy(model))}
    rows = {r["variant"]: r for r in compare_to_reference(model, variants, tokens, window=64)}
    assert rows["copy"]["tokens"] == 2 * 63  # 2 whole windows, each predicting 63 next tokens
    assert rows["copy"]["top1_agreement"] == 1.0 and abs(rows["copy"]["kl_nats_per_token"]) < 1e-6
    assert rows["copy"]["perplexity_change"] == pytest.approx(0.0, abs=1e-9)
    assert rows["int8"]["top1_agreement"] > 0.9 and 0 <= rows["int8"]["kl_nats_per_token"] < 1e-3


def test_weight_bytes_counts_the_tied_matrix_once(model: GPT2LMHeadModel) -> None:
    held, read = weight_bytes(model)
    assert held == 4 * model.num_parameters()  # num_parameters counts the tied matrix once too
    assert read == held - 4 * model.transformer.wpe.weight.numel()  # positions are gathered, not read whole


def test_modes_are_parsed_and_checked(model: GPT2LMHeadModel) -> None:
    assert parse_modes("kv, hf,kv") == ["kv", "hf"]
    with pytest.raises(InvalidArgumentError, match="unknown mode"):
        parse_modes("kv,fast")
    kv, bf16 = build_modes(["kv", "bf16"], model)
    assert bf16.model_bytes < 0.6 * kv.model_bytes and next(model.parameters()).dtype == torch.float32


def test_timeline_metrics() -> None:
    # Three blocks: the first token at 1.0 s, then a block of 1 at 1.5 s, then a block of 2 at 2.5 s.
    t = Timeline(0.0, [1.0, 1.5, 2.5], [1, 1, 2], torch.zeros(2, 4, dtype=torch.long), peak_bytes=0)
    assert t.ttft == 1.0 and t.total == 2.5
    assert t.decode_latencies() == [0.5, 0.5, 0.5]
    assert t.decode_tokens_per_s() == pytest.approx(2 * 3 / 1.5)
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([5], 99) == 5
    assert token_agreement(torch.tensor([[1, 2, 3]]), torch.tensor([[1, 0, 3, 4]])) == pytest.approx(2 / 3)


def test_machine_description_and_bandwidth() -> None:
    info = describe_machine("cpu")
    assert info["cpu_logical_cores"] >= 1 and info["torch"] == torch.__version__ and info["gpu"] is None
    assert measure_read_bandwidth("cpu", nbytes=8 * 2**20, repeats=2) > 1e8  # > 0.1 GB/s on anything


def test_allocation_trace_replays_allocations_and_frees() -> None:
    def work() -> None:
        a = torch.empty(1000, dtype=torch.uint8)
        b = torch.empty(500, dtype=torch.uint8)
        del a
        c = torch.empty(2000, dtype=torch.uint8)
        del b, c

    trace = trace_allocations(work)
    assert trace.allocations == 3 and trace.largest_bytes >= 2000
    assert trace.peak_bytes >= 2500 and trace.allocated_bytes >= 3500


def test_the_profiler_keeps_quiet_on_stderr(capfd: pytest.CaptureFixture[str]) -> None:
    """torch's profiler writes 'USDT ... profiler_start' and '... profiler_stop' lines to file descriptor 2 (not
    Python's sys.stderr) in every `toyllm bench`; the bench hides them, and only them."""
    trace = trace_allocations(lambda: torch.ones(1000) + 1)
    assert trace.allocations >= 1
    err = capfd.readouterr().err
    assert "profiler_start" not in err and "profiler_stop" not in err


def test_the_bench_does_not_print_the_unknown_memory_block_warning() -> None:
    """torch warns from C++ when a memory profile sees a block freed that was allocated before it started (the first
    time, then every 1000th), which any workload freeing earlier tensors does. The bench spends the first in a
    throwaway profile with stderr hidden. Hence a fresh process, whose workload frees a tensor made before profiling."""
    code = (
        "import torch\n"
        "from toyllm.bench.memory import trace_allocations\n"
        "old = [torch.ones(1000)]\n"
        "trace = trace_allocations(lambda: (old.clear(), torch.ones(500) + 1))\n"
        "print('ok', trace.allocations)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.startswith("ok"), run.stderr
    assert "allocated before the profiling started" not in run.stderr, run.stderr
