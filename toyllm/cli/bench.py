"""`toyllm bench`: generation speed and memory, compared across modes in one run, written as table, JSON, CSV, PNG.

    toyllm bench --modes naive,kv,hf              one shape, several modes, alternating (the main form)
    toyllm bench sweep --lengths 16,64,256,1000   naive vs KV over generated lengths
    toyllm bench prefill                          chunked vs one-shot prefill: peak activation memory, same logits
    toyllm bench overhead                         Python/dispatch cost per decode step, allocations, profile
    toyllm bench profile --modes kv,hf,int8       which operators take the time of a decode step, per mode
    toyllm bench accuracy --model DIR --text F    what bf16 and int8 cost: top-1 agreement, KL, perplexity
    toyllm bench speculative                      speculative decoding against plain KV decoding

The library does the work (toyllm/bench/); this module parses options, shows progress and prints tables. The heavy
imports happen inside the commands so that `toyllm --help` answers at once.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from toyllm.cli.app import app
from toyllm.errors import InvalidArgumentError

bench_app = typer.Typer(
    name="bench",
    rich_markup_mode="rich",
    no_args_is_help=False,
)
app.add_typer(bench_app, name="bench")
# Piped or redirected output has no width to respect: let tables keep their lines instead of wrapping at 80.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True, highlight=False)

MODEL_HELP = "Hub id, local checkpoint directory, or random:<preset> (random weights have the same speed)."
Model = Annotated[str, typer.Option("--model", "-m", help=MODEL_HELP)]
BatchSize = Annotated[int, typer.Option("--batch-size", "-b", help="Prompts decoded together.")]
PromptLen = Annotated[int, typer.Option("--prompt-len", help="Prompt tokens (random ids, seeded).")]
SeqLen = Annotated[
    int | None,
    typer.Option(
        "--seq-len", help="Total tokens per row, prompt included; sets --max-new-tokens to SEQ_LEN - PROMPT_LEN."
    ),
]
MaxNew = Annotated[
    int, typer.Option("--max-new-tokens", "-n", help="Tokens generated per run (greedy, no early stop).")
]
Warmup = Annotated[int, typer.Option("--warmup", help="Untimed runs per mode first (compilation happens here).")]
Repeats = Annotated[int, typer.Option("--repeats", "-r", help="Timed runs per mode, alternating modes.")]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
Dtype = Annotated[str, typer.Option("--dtype", help="Base dtype of the model: float32, bfloat16 or float16.")]
Seed = Annotated[int, typer.Option("--seed", help="Seeds the random weights and the prompt.")]
Threads = Annotated[int | None, typer.Option("--threads", help="torch CPU threads (default: torch's choice).")]


def _output_folder(path: Path) -> Path:
    """Checked as the options are read: a run takes minutes, and a file in the way was found only when it wrote."""
    for p in (path, *path.parents):
        if p.is_symlink() and not p.exists():
            raise InvalidArgumentError(f"--out {path}: {p} is a broken symbolic link")
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        raise InvalidArgumentError(f"--out {path}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK):
        raise InvalidArgumentError(f"--out {path}: {existing} is not writable")
    return path


OUT_HELP = "Directory for the results: JSON, plus the CSV, Markdown and PNG files this command makes."
Out = Annotated[Path, typer.Option("--out", "-o", help=OUT_HELP, callback=_output_folder)]
# The group's own --out: click runs an option's callback even on its default, and the group's options are parsed for
# every subcommand too, so `bench` checks its folder in its body, and only when it runs itself.
GroupOut = Annotated[Path, typer.Option("--out", "-o", help="Directory for the JSON, CSV, Markdown and PNG files.")]
NoPlots = Annotated[bool, typer.Option("--no-plots", help="Write JSON and CSV only.")]

DEFAULT_MODEL = "random:gpt2"
DEFAULT_OUT = Path("bench_out")


def _progress() -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
    )


def _print_written(paths: list[Path]) -> None:
    err_console.print("wrote " + ", ".join(str(p) for p in paths), soft_wrap=True)


def _max_new(max_new_tokens: int, seq_len: int | None, prompt_len: int) -> int:
    from toyllm.errors import InvalidArgumentError

    if seq_len is None:
        return max_new_tokens
    if seq_len <= prompt_len:
        raise InvalidArgumentError(f"seq-len ({seq_len}) must exceed prompt-len ({prompt_len})")
    return seq_len - prompt_len


BENCH_HELP = """Compare generation modes at one shape: first-token time, decode latency percentiles, tokens/s, memory.

Every mode decodes the same random prompt greedily with the same weights: warm-up runs first, then REPEATS rounds in \
which the modes alternate, so that a busy machine slows all of them alike. Reported: min and median over the \
repeats, p50/p90/p99 over every decode step, and the fraction of the memory-bandwidth roofline reached.

[bold]Examples[/bold]

  toyllm bench --modes naive,kv,hf      (GPT-2 124M shape, random weights: the same speed as real ones)

  toyllm bench --modes kv,bf16,int8,hf --model gpt2 -n 128 -r 5

  toyllm bench sweep --lengths 16,64,256,1000      (naive vs KV: where the cache wins)
"""


@bench_app.callback(invoke_without_command=True, help=BENCH_HELP)
def bench(
    ctx: typer.Context,
    modes: Annotated[
        str,
        typer.Option(
            "--modes",
            help="Comma-separated: naive, kv, kv+compile, onednn, bf16, int8, fp16w, int8-dyn, gemv, gemv-bf16,"
            " gemv-int8, amx, speculative, hf; bf16, int8 and the gemv modes also as <mode>+compile.",
        ),
    ] = "naive,kv,hf",
    model: Model = DEFAULT_MODEL,
    batch_size: BatchSize = 1,
    prompt_len: PromptLen = 16,
    seq_len: SeqLen = None,
    max_new_tokens: MaxNew = 128,
    warmup: Warmup = 1,
    repeats: Repeats = 3,
    device: Device = "auto",
    dtype: Dtype = "float32",
    seed: Seed = 0,
    threads: Threads = None,
    draft: Annotated[
        str | None, typer.Option("--draft", help="Draft model of the speculative mode (default: first layers).")
    ] = None,
    out: GroupOut = DEFAULT_OUT,
    no_plots: NoPlots = False,
) -> None:
    if ctx.invoked_subcommand is not None:
        return
    _output_folder(out)
    from toyllm.bench.report import default_baseline, results_tables
    from toyllm.bench.suite import BenchSettings, benchmark, write_run_report

    settings = BenchSettings(
        model=model,
        modes=modes.split(","),
        batch_size=batch_size,
        prompt_len=prompt_len,
        max_new_tokens=_max_new(max_new_tokens, seq_len, prompt_len),
        warmup=warmup,
        repeats=repeats,
        device=device,
        dtype=dtype,
        seed=seed,
        threads=threads,
        draft=draft,
    )
    settings.validate()
    runs = (warmup + repeats + 1) * len(settings.modes)  # + 1: the traced run that measures peak allocations
    with _progress() as progress:
        task = progress.add_task("benchmarking", total=runs)
        payload = benchmark(settings, advance=lambda mode: progress.advance(task))
    rows = payload["results"]
    title = (
        f"{model}, batch {batch_size}, prompt {prompt_len}, {settings.max_new_tokens} new tokens, "
        f"{payload['machine']['device']}, {payload['machine']['cpu_model']}"
    )
    for table in results_tables(rows, title, baseline=default_baseline(rows)):
        console.print(table)
    bandwidth = payload.get("bandwidth_bytes_per_s")
    if bandwidth:
        console.print(f"measured read bandwidth: {bandwidth / 1e9:.1f} GB/s (roofline = bandwidth / weight bytes read)")
    _print_written(write_run_report(payload, out, plots=not no_plots))


@bench_app.command()
def sweep(
    modes: Annotated[str, typer.Option("--modes", help="Modes to compare at each length.")] = "naive,kv",
    lengths: Annotated[
        str, typer.Option("--lengths", help="Comma-separated generated lengths.")
    ] = "16,32,64,128,256,512,1000",
    model: Model = DEFAULT_MODEL,
    batch_size: BatchSize = 1,
    prompt_len: PromptLen = 16,
    warmup: Warmup = 1,
    repeats: Repeats = 1,
    device: Device = "auto",
    dtype: Dtype = "float32",
    seed: Seed = 0,
    threads: Threads = None,
    out: Out = DEFAULT_OUT,
    no_plots: NoPlots = False,
) -> None:
    """Generation time of each mode over generated lengths, and the speedup over naive: where the cache wins."""
    from toyllm.bench.report import simple_table
    from toyllm.bench.suite import BenchSettings, write_sweep_report
    from toyllm.bench.suite import sweep as run
    from toyllm.bench.sweep import SWEEP_COLUMNS
    from toyllm.errors import InvalidArgumentError

    try:
        sizes = sorted({int(x) for x in lengths.split(",") if x.strip()})
    except ValueError:
        raise InvalidArgumentError(f"--lengths must be comma-separated integers, got '{lengths}'") from None
    settings = BenchSettings(
        model=model,
        modes=modes.split(","),
        batch_size=batch_size,
        prompt_len=prompt_len,
        max_new_tokens=max(sizes) if sizes else 1,
        warmup=warmup,
        repeats=repeats,
        device=device,
        dtype=dtype,
        seed=seed,
        threads=threads,
    )
    settings.validate()
    n_modes = len(settings.modes)
    total = n_modes * (warmup * (sizes[0] if sizes else 0) + repeats * sum(sizes))
    with _progress() as progress:
        task = progress.add_task("sweep", total=total)

        def advance(mode: str, tokens: int) -> None:
            progress.update(task, advance=tokens, description=f"sweep: {mode} done at {tokens} tokens")

        payload = run(settings, sizes, advance=advance)
    console.print(simple_table(payload["results"], f"{model}: generation time by length", SWEEP_COLUMNS))
    if payload["kv_never_slower"] is not None:
        console.print(f"kv never slower than naive at these lengths: {payload['kv_never_slower']}")
    _print_written(write_sweep_report(payload, out, plots=not no_plots))


@bench_app.command()
def prefill(
    model: Model = DEFAULT_MODEL,
    prompt_len: Annotated[int, typer.Option("--prompt-len", help="Prompt tokens (capped at the context).")] = 1024,
    chunk_size: Annotated[int, typer.Option("--chunk-size", help="Tokens per prefill chunk.")] = 256,
    batch_size: BatchSize = 1,
    device: Device = "auto",
    dtype: Dtype = "float32",
    seed: Seed = 0,
    threads: Threads = None,
    out: Out = DEFAULT_OUT,
) -> None:
    """Chunked vs one-shot prefill: peak activation memory (exact, from the allocator's events) and the logits gap."""
    from toyllm.bench.machine import describe_machine
    from toyllm.bench.prefill import chunked_prefill_memory
    from toyllm.bench.report import simple_table, write_json
    from toyllm.bench.suite import BenchSettings, load

    settings = BenchSettings(model=model, prompt_len=1, device=device, dtype=dtype, seed=seed, threads=threads)
    loaded, _ = load(settings)
    result = chunked_prefill_memory(loaded, prompt_len, chunk_size, batch_size, seed)
    console.print(simple_table([result], f"{model}: chunked prefill"))
    payload = {"kind": "prefill", "machine": describe_machine(next(loaded.parameters()).device), "result": result}
    _print_written([write_json(out / "prefill.json", payload)])


@bench_app.command()
def overhead(
    model: Model = DEFAULT_MODEL,
    batch_size: BatchSize = 1,
    max_new_tokens: MaxNew = 64,
    repeats: Repeats = 3,
    device: Device = "auto",
    dtype: Dtype = "float32",
    seed: Seed = 0,
    threads: Threads = None,
    out: Out = DEFAULT_OUT,
) -> None:
    """Per decode step: Python/dispatch overhead (a zero-width twin model), allocations, and the top operators."""
    from toyllm.bench.machine import describe_machine
    from toyllm.bench.modes import ToyllmMode
    from toyllm.bench.overhead import decode_profile, step_allocations, step_overhead
    from toyllm.bench.report import simple_table, write_json
    from toyllm.bench.suite import BenchSettings, load

    settings = BenchSettings(model=model, device=device, dtype=dtype, seed=seed, threads=threads, batch_size=batch_size)
    loaded, ids = load(settings)
    timing = step_overhead(loaded, batch_size, max_new_tokens, repeats)
    allocations = step_allocations(loaded, batch_size, steps=max(1, max_new_tokens // 2))
    profile = decode_profile(ToyllmMode("kv", loaded), ids, max(1, max_new_tokens // 4))
    console.print(simple_table([timing], f"{model}: decode step vs its zero-width twin (pure overhead)"))
    console.print(simple_table([allocations], "allocations per decode step (the cache is preallocated)"))
    console.print(simple_table(profile, "where a decode step spends its time (torch.profiler, self time)"))
    payload = {
        "kind": "overhead",
        "machine": describe_machine(next(loaded.parameters()).device),
        "timing": timing,
        "allocations": allocations,
        "profile": profile,
    }
    _print_written([write_json(out / "overhead.json", payload)])


@bench_app.command()
def profile(
    modes: Annotated[str, typer.Option("--modes", help="Modes to profile (as for `toyllm bench`).")] = "kv,hf",
    model: Model = DEFAULT_MODEL,
    batch_size: BatchSize = 1,
    prompt_len: PromptLen = 16,
    steps: Annotated[int, typer.Option("--steps", help="Decode steps profiled per mode.")] = 16,
    top: Annotated[int, typer.Option("--top", help="Operators listed per mode.")] = 10,
    device: Device = "auto",
    dtype: Dtype = "float32",
    seed: Seed = 0,
    threads: Threads = None,
    out: Out = DEFAULT_OUT,
) -> None:
    """Where a decode step spends its time, operator by operator (torch.profiler self time), for each mode."""
    from toyllm.bench.machine import describe_machine
    from toyllm.bench.modes import build_modes
    from toyllm.bench.overhead import decode_profile
    from toyllm.bench.report import simple_table, write_json
    from toyllm.bench.suite import BenchSettings, load

    settings = BenchSettings(
        model=model,
        modes=modes.split(","),
        batch_size=batch_size,
        prompt_len=prompt_len,
        device=device,
        dtype=dtype,
        seed=seed,
        threads=threads,
    )
    loaded, ids = load(settings)
    profiles = {}
    for mode in build_modes(settings.modes, loaded):
        profiles[mode.name] = decode_profile(mode, ids, steps, top)
        console.print(simple_table(profiles[mode.name], f"{mode.name}: per decode step (torch.profiler self time)"))
    payload = {"kind": "profile", "machine": describe_machine(ids.device), "steps": steps, "profiles": profiles}
    _print_written([write_json(out / "profile.json", payload)])


@bench_app.command()
def accuracy(
    model: Annotated[str, typer.Option("--model", "-m", help="A trained checkpoint (random weights tell nothing).")],
    text: Annotated[
        Path | None,
        typer.Option(
            "--text", help="Held-out text file or `toyllm prepare` directory (its val.bin); default: random ids."
        ),
    ] = None,
    variants: Annotated[
        str, typer.Option("--variants", help="Comma-separated: bf16, int8, fp16w, int8-dyn.")
    ] = "bf16,int8,fp16w,int8-dyn",
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Tokens of the text to score.")] = 16384,
    window: Annotated[int, typer.Option("--window", help="Tokens per scored window.")] = 256,
    device: Device = "auto",
    seed: Seed = 0,
    threads: Threads = None,
    out: Out = DEFAULT_OUT,
) -> None:
    """Accuracy cost of bf16 and int8 against float32: top-1 agreement, KL divergence, perplexity change."""
    import torch

    from toyllm.bench.accuracy import compare_to_reference
    from toyllm.bench.machine import describe_machine
    from toyllm.bench.modes import VARIANTS
    from toyllm.bench.report import simple_table, write_json
    from toyllm.bench.suite import BenchSettings, load
    from toyllm.errors import InvalidArgumentError

    names = [v.strip() for v in variants.split(",") if v.strip()]
    # The gemv variants are left out: they compute the same products as bf16 and int8, and only for up to 32 rows,
    # so over these windows they would measure torch's path under another name.
    allowed = [v for v in VARIANTS if not v.startswith("gemv")]
    if not names or any(v not in allowed for v in names):
        raise InvalidArgumentError(f"--variants must be among {', '.join(allowed)}, got '{variants}'")
    settings = BenchSettings(model=model, prompt_len=1, device=device, dtype="float32", seed=seed, threads=threads)
    reference, _ = load(settings)
    if text is not None:
        from toyllm.tokenizer import load_tokenizer
        from toyllm.train.evaluate import load_eval_tokens

        tokens = load_eval_tokens(text, load_tokenizer(model), max_tokens)
    else:
        generator = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, reference.config.vocab_size, (max_tokens,), generator=generator)
    rows = compare_to_reference(reference, {v: VARIANTS[v](reference) for v in names}, tokens, window)
    source = str(text) if text is not None else "random token ids"
    console.print(simple_table(rows, f"{model} on {source}: accuracy against float32"))
    payload = {
        "kind": "accuracy",
        "machine": describe_machine(next(reference.parameters()).device),
        "model": model,
        "text": source,
        "results": rows,
    }
    _print_written([write_json(out / "accuracy.json", payload)])


@bench_app.command()
def kernel(
    model: Model = DEFAULT_MODEL,
    rows: Annotated[str, typer.Option("--rows", help="Comma-separated activation row counts.")] = "1,2,3,5,8,9,16",
    repeats: Repeats = 5,
    threads: Threads = None,
    baseline: Annotated[
        Path | None,
        typer.Option(
            "--baseline",
            help="Another gemv.cpp (e.g. from `git show REV:toyllm/kernels/gemv.cpp`) to time against the current "
            "kernel, interleaved in this process (float32, the same row counts).",
        ),
    ] = None,
    huge_pages: Annotated[
        bool,
        typer.Option(
            "--huge-pages",
            help="Also time the kernel on the same weights in 2 MB huge pages against 4 KB pages, interleaved "
            "(Linux transparent huge pages).",
        ),
    ] = False,
    out: Out = DEFAULT_OUT,
) -> None:
    """toyllm's CPU kernel alone: GB/s for float32, bfloat16 and int8 weights vs torch, and the cost of more rows."""
    import torch

    from toyllm import hugepages, kernels
    from toyllm.bench.kernel import compare_huge_pages, compare_kernels, kernel_bench, plot_kernel
    from toyllm.bench.machine import describe_machine
    from toyllm.bench.report import simple_table, write_json
    from toyllm.bench.suite import BenchSettings, load
    from toyllm.errors import InvalidArgumentError

    try:
        counts = sorted({int(r) for r in rows.split(",") if r.strip()} | {1})
    except ValueError:
        raise InvalidArgumentError(f"--rows must be comma-separated integers, got '{rows}'") from None
    if counts[0] < 1 or counts[-1] > kernels.MAX_ROWS:
        raise InvalidArgumentError(
            f"--rows must be between 1 and {kernels.MAX_ROWS} (the kernel's range), got '{rows}'"
        )
    baseline_op = kernels.load_baseline(baseline) if baseline is not None else None  # its errors before any work
    if huge_pages and not hugepages.available():  # also checked by compare_huge_pages; here, before any work
        raise InvalidArgumentError(hugepages.UNAVAILABLE.format(what="--huge-pages"))
    loaded, _ = load(BenchSettings(model=model, prompt_len=1, device="cpu", dtype="float32", threads=threads))
    result = kernel_bench(loaded, counts, repeats)
    console.print(simple_table(result["formats"], f"{model}: one pass over every Linear weight, 1 row"))
    console.print(simple_table(result["rows"], "float32, M rows vs 1 row"))
    if baseline_op is not None:
        result["baseline"] = {"source": str(baseline), "rows": compare_kernels(loaded, baseline_op, counts, repeats)}
        console.print(simple_table(result["baseline"]["rows"], f"current kernel vs {baseline}, interleaved"))
    if huge_pages:
        result["huge_pages"] = pages = compare_huge_pages(loaded, counts, repeats)
        console.print(simple_table(pages["rows"], "weights in 2 MB vs 4 KB pages, interleaved"))
        backed = pages["huge_page_bytes"]
        console.print(
            f"huge pages granted: {backed['huge'] / 2**20:.0f} MiB under the huge copy, {backed['small'] / 2**20:.0f} "
            f"MiB under the 4 KB copy, of {pages['weight_bytes'] / 2**20:.0f} MiB of weights each"
        )
    console.print(f"measured read bandwidth: {result['read_bandwidth_gb_s']:.1f} GB/s")
    payload = {"kind": "kernel", "model": model, "machine": describe_machine(torch.device("cpu")), "result": result}
    out.mkdir(parents=True, exist_ok=True)
    plot_kernel(result, out / "kernel.png")
    _print_written([write_json(out / "kernel.json", payload), out / "kernel.png"])


@bench_app.command()
def speculative(
    target: Annotated[str, typer.Option("--target", help="The model whose output is produced.")] = "random:gpt2-medium",
    draft: Annotated[str, typer.Option("--draft", help="The draft model of the `draft` case.")] = "random:gpt2",
    cases: Annotated[
        str, typer.Option("--cases", help="Comma-separated: draft, same, self; timed in this order.")
    ] = "draft,same,self",
    lookaheads: Annotated[str, typer.Option("--lookaheads", help="Comma-separated lookahead values K.")] = "2,4,8",
    schedules: Annotated[
        str,
        typer.Option("--schedules", help="Comma-separated: constant, heuristic, threshold, threshold-flat."),
    ] = "constant",
    self_layers: Annotated[
        int | None, typer.Option("--self-layers", help="Layers of the self draft (default n_layer // 4).")
    ] = None,
    max_new_tokens: MaxNew = 64,
    prompt_len: PromptLen = 32,
    prompts: Annotated[
        int, typer.Option("--prompts", help="How many prompts (with --prompt-file: spread over its last 5%).")
    ] = 1,
    batch: Annotated[
        int, typer.Option("--batch", help="Decode this many prompts at once (batched plain vs batched speculative).")
    ] = 1,
    repeats: Annotated[
        int, typer.Option("--repeats", help="Time everything this many times, interleaved; keep each fastest.")
    ] = 1,
    temperature: Annotated[float, typer.Option("--temperature", help="0 is greedy.")] = 0.0,
    device: Device = "auto",
    dtype: Annotated[str | None, typer.Option("--dtype", help="float32, bfloat16 or float16.")] = None,
    seed: Seed = 0,
    threads: Threads = None,
    kernels: Annotated[
        bool, typer.Option("--kernels", help="Decode both models through toyllm's CPU kernel (toyllm/kernels).")
    ] = False,
    amx: Annotated[
        bool,
        typer.Option("--amx", help="Their linear layers on AMX tiles in bfloat16 instead (Intel CPUs with AMX)."),
    ] = False,
    prompt_file: Annotated[
        Path | None,
        typer.Option("--prompt-file", help="Take the prompt from the end of this text file (default: random ids)."),
    ] = None,
    draft_vocab: Annotated[
        int | None,
        typer.Option("--draft-vocab", help="Drafts (draft, self) score only this many tokens: the most frequent."),
    ] = None,
    draft_vocab_data: Annotated[
        Path | None,
        typer.Option("--draft-vocab-data", help="Prepared directory to count them in (default: GPT-2's id order)."),
    ] = None,
    out: Out = DEFAULT_OUT,
) -> None:
    """Speculative decoding against plain KV decoding of the same target: tokens/s, acceptance, speedup vs theory."""
    from toyllm.bench.speculative import format_table, run_speculative_bench
    from toyllm.errors import InvalidArgumentError

    try:
        ks = [int(k) for k in lookaheads.split(",") if k.strip()]
    except ValueError:
        raise InvalidArgumentError(f"--lookaheads must be comma-separated integers, got '{lookaheads}'") from None
    results = run_speculative_bench(
        target,
        draft,
        cases=[c.strip() for c in cases.split(",") if c.strip()],
        lookaheads=ks,
        schedules=[x.strip() for x in schedules.split(",") if x.strip()],
        self_layers=self_layers,
        max_new_tokens=max_new_tokens,
        prompt_tokens=prompt_len,
        prompts=prompts,
        batch=batch,
        repeats=repeats,
        temperature=temperature,
        seed=seed,
        device=device,
        dtype=dtype,
        threads=threads,
        kernels=kernels,
        amx=amx,
        prompt_file=prompt_file,
        draft_vocab=draft_vocab,
        draft_vocab_data=draft_vocab_data,
        out_dir=out,
        progress=lambda message: err_console.print(message),
    )
    console.print(format_table(results), markup=False)
    _print_written([out / "speculative.json", out / "speculative_speedup.png"])
