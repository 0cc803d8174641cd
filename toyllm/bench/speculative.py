"""Benchmark: speculative decoding against plain KV-cache decoding of the same target, in one process.

For each case (a draft for the target) and each lookahead K it reports tokens/s of both, the acceptance rate
alpha, the cost ratio c = (one draft forward) / (one target forward), both measured, and the measured speedup next
to the theoretical one of Leviathan et al. (2023):

    speedup(alpha, K, c) = (1 - alpha^(K+1)) / ((1 - alpha) * (c*K + 1))        (-> (K+1)/(c*K+1) as alpha -> 1)

The formula models decoding only: it has no prompt phase. So the speedup it is compared with is the decode speedup,
the ratio of per-token decoding times with both runs' prompt prefills left out (a speculative run prefills the prompt
in both models, and with a short generation that one-time cost is several decoding steps). The end-to-end speedup,
prompt included, is reported next to it.

The formula also assumes a verification forward over K + 1 tokens costs as much as a one-token forward. That holds when
decoding is memory-bound, but on a CPU a (K + 1)-token matmul can cost several one-token ones, so the report also
gives the measured ratio v = `verify_over_step` and the same formula with `c*K + v` in the denominator.

Cases: `draft` (a separate draft model, e.g. gpt2 for gpt2-medium), `same` (the draft is the target itself: alpha = 1,
c = 1, so it bounds the overhead), `self` (self-speculative: the target's first layers). Decoding is greedy by default,
so every speculative output is also checked token for token against plain decoding (`outputs_match`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from toyllm import kernels as toyllm_kernels
from toyllm.bench.machine import describe_machine
from toyllm.device import resolve_device, resolve_dtype
from toyllm.errors import InvalidArgumentError, check_count
from toyllm.generation import GenerationConfig, GenerationStats, generate
from toyllm.gpt2.model import GPT2LMHeadModel
from toyllm.kernels.amx import use_amx
from toyllm.sampling import validate_seed
from toyllm.speculative import (
    LookaheadSchedule,
    SpeculativeStats,
    ThresholdSchedule,
    batch_speculative_stream,
    check_draft,
    draft_vocabulary,
    speculative_stream,
)
from toyllm.tokenizer import load_tokenizer

CASES = ("draft", "same", "self")
# `threshold-flat` is the threshold schedule with the paper's cost model, v(k) = 1 (verification costs one target
# forward whatever k is): the ablation that shows what learning v(k) is worth.
SCHEDULES = ("constant", "heuristic", "threshold", "threshold-flat")


def theoretical_speedup(alpha: float, lookahead: int, cost_ratio: float, verify_cost: float = 1.0) -> float:
    """Expected walltime improvement of speculative decoding (Leviathan et al. 2023, Theorem 3.8).

    `verify_cost` is the (K + 1)-token verification forward in units of a one-token target forward; the paper
    takes it as 1, which holds when decoding is memory-bound (GPUs); on a CPU it can be several times more.
    """
    tokens = lookahead + 1 if alpha >= 1 else (1 - alpha ** (lookahead + 1)) / (1 - alpha)
    return tokens / (cost_ratio * lookahead + verify_cost)


def _timed_plain(model: GPT2LMHeadModel, ids: torch.Tensor, config: GenerationConfig) -> tuple[torch.Tensor, dict]:
    """Plain KV decoding of one prompt: its output and times."""
    stats = GenerationStats()
    start = time.perf_counter()
    out = generate(model, ids, config, stats=stats)
    seconds = time.perf_counter() - start
    steps = max(1, stats.new_tokens - 1)  # decode forwards: the first token comes from the prefill
    rows = ids.shape[0]  # a forward decodes one token of every row
    return out, {
        "seconds": seconds,
        "decode_seconds": stats.decode_seconds,
        "tokens": stats.new_tokens * rows,
        "steps": steps,
        "rows": rows,
    }


def _plain_totals(runs: list[dict]) -> dict[str, float]:
    """One plain measurement per prompt, added up."""
    seconds = sum(r["seconds"] for r in runs)
    return {
        "seconds": seconds,
        "tokens_per_second": sum(r["tokens"] for r in runs) / seconds,
        "step_seconds": sum(r["decode_seconds"] for r in runs) / sum(r["steps"] for r in runs),  # one decode forward
        "token_seconds": sum(r["decode_seconds"] for r in runs) / sum(r["steps"] * r["rows"] for r in runs),
    }


def _timed_speculative(
    target: GPT2LMHeadModel,
    draft: GPT2LMHeadModel,
    ids: torch.Tensor,
    config: GenerationConfig,
    schedule: LookaheadSchedule | None = None,
) -> tuple[torch.Tensor, SpeculativeStats, float]:
    """Speculative decoding of one prompt (or one batch): its output (prompt first, like `generate`), counters and
    seconds."""
    spec = SpeculativeStats()
    stream = batch_speculative_stream if ids.shape[0] > 1 else speculative_stream
    start = time.perf_counter()
    out = torch.cat([ids, *stream(target, draft, ids, config, spec_stats=spec, schedule=schedule)], dim=1)
    return out, spec, time.perf_counter() - start


def _faster(best: Any, run: Any, seconds: Callable[[Any], float]) -> Any:
    """The faster of two measurements of the same thing (the one less disturbed by other work); None counts as none."""
    return run if best is None or seconds(run) < seconds(best) else best


def _row(
    case: str,
    draft_name: str,
    K: int,
    schedule: str,
    spec: SpeculativeStats,
    seconds: float,
    plain: dict[str, float],
    c: float,
    outputs_match: bool | None,
) -> dict[str, Any]:
    """One line of results: a speculative run next to the plain run it is compared with."""
    alpha = spec.alpha  # per judged draft: the alpha of the formula
    v = spec.verify_seconds / max(1, spec.rounds) / plain["step_seconds"]  # verify forward, in target steps
    known = math.isfinite(alpha) and schedule == "constant"  # the formula is for a fixed K
    return {
        "case": case,
        "draft": draft_name,
        "lookahead": K,  # the schedule's K: fixed (constant), starting (heuristic) or at most (threshold)
        "schedule": schedule,
        "mean_lookahead": float(np.mean(spec.lookaheads)) if spec.lookaheads else float("nan"),
        "tokens_per_second": spec.new_tokens / seconds,
        "plain_tokens_per_second": plain["tokens_per_second"],
        "acceptance_rate": spec.acceptance_rate,
        "alpha": alpha,
        "tokens_per_target_forward": spec.tokens_per_round,
        "cost_ratio": c,
        "cost_ratio_in_run": spec.cost_ratio,
        "verify_over_step": v,
        "speedup": plain["seconds"] / seconds,
        # Per-token decoding time of each run, the prompt prefills left out of both: the formula's quantity. (The
        # draft's prompt forward also yields its first proposal, so the speculative side is spared one draft step
        # per prompt: for c = 1 and 64 tokens, about 1.5% in its favour.)
        "decode_speedup": plain["token_seconds"] / ((seconds - spec.prompt_seconds) / max(1, spec.new_tokens)),
        "theoretical_speedup": theoretical_speedup(alpha, K, c) if known else float("nan"),
        "theoretical_speedup_with_verify_cost": theoretical_speedup(alpha, K, c, v) if known else float("nan"),
        "target_forwards": spec.target_forwards,
        "draft_forwards": spec.draft_forwards,
        "prompt_forwards": spec.prompt_forwards,  # left out of the decode speedup, with their `prompt` seconds
        "compactions": spec.compactions,  # batches: times the caches' holes were closed
        "seconds": {
            "total": seconds,
            "target": spec.target_seconds,
            "draft": spec.draft_seconds,
            "other": spec.other_seconds,
            "prompt": spec.prompt_seconds,
        },
        "outputs_match": outputs_match,
    }


def run_speculative_bench(
    target: str = "random:gpt2-medium",
    draft: str = "random:gpt2",
    *,
    cases: Sequence[str] = CASES,
    lookaheads: Sequence[int] = (2, 4, 8),
    schedules: Sequence[str] = ("constant",),
    self_layers: int | None = None,
    max_new_tokens: int = 64,
    prompt_tokens: int = 32,
    prompts: int = 1,
    batch: int = 1,
    repeats: int = 1,
    temperature: float = 0.0,
    seed: int = 0,
    device: str = "cpu",
    dtype: str | None = None,
    threads: int | None = None,
    kernels: bool = False,
    amx: bool = False,
    prompt_file: str | Path | None = None,
    draft_vocab: int | None = None,
    draft_vocab_data: str | Path | None = None,
    out_dir: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the benchmark; return the results (and write `speculative.json` + `speculative_speedup.png` to `out_dir`).

    target, draft: model names as `toyllm generate` takes them (Hub id, local directory, `random:<preset>`).
    cases: any of `draft`, `same`, `self`. schedules: lookahead schedules to time at each K (for `threshold` K is
    the most drafts a round may propose, for `heuristic` where it starts); the formula's columns are for `constant`
    only. self_layers: layers of the self-speculative draft (default n_layer // 4).
    Each of the `prompts` prompts is `prompt_tokens` random token ids (seeded), or a window of `prompt_file`'s text
    (trained models agree far more often on real text): one prompt is its last `prompt_tokens` tokens; several are
    spread evenly over its last 5%, the held-out tail that `toyllm prepare` makes the validation split. Times and
    counts add up over the prompts; each prompt's time in each mode is the fastest of `repeats`. EOS is ignored, so
    every run makes `max_new_tokens`. batch: decode `batch` prompts at once in every run (plain batched decoding
    against batched speculative decoding; each of the `prompts` units is then a batch of that many windows).
    threads: torch CPU threads (None leaves torch's default). kernels: decode both models through toyllm's CPU
    kernel, which reads each weight once for all K + 1 verified rows (toyllm/kernels). amx: their linear layers on
    AMX tiles instead, in bfloat16 (toyllm/kernels/amx.py), where K + 1 rows cost about what one does.
    draft_vocab: restrict the `draft` and `self` drafts' output to this many tokens, the most frequent in
    `draft_vocab_data` (a prepared directory) or else ids 0..n-1 (`toyllm.speculative.vocab`).
    Returns {"machine": ..., "settings": ..., "plain": {...}, "rows": [one dict per (case, K)]}.
    """
    if not cases or not lookaheads or min(lookaheads) < 1:  # an empty run would overwrite a report with nothing
        raise InvalidArgumentError("--cases and --lookaheads must each name at least one value, lookaheads >= 1")
    for name, value in (("prompts", prompts), ("batch", batch), ("repeats", repeats), ("prompt-len", prompt_tokens)):
        check_count(f"--{name}", value)
    validate_seed(seed)
    if threads is not None:
        check_count("--threads", threads)
    if not schedules or set(schedules) - set(SCHEDULES):
        raise InvalidArgumentError(f"--schedules takes any of {', '.join(SCHEDULES)}, got {', '.join(schedules)}")
    unknown = set(cases) - set(CASES)
    if unknown:
        raise InvalidArgumentError(f"unknown case(s) {sorted(unknown)}; choose from {', '.join(CASES)}")
    if draft_vocab_data is not None and draft_vocab is None:
        raise InvalidArgumentError("--draft-vocab-data needs --draft-vocab N, the number of tokens to keep")
    if draft_vocab is not None and (draft_vocab < 1 or not {"draft", "self"} & set(cases)):
        raise InvalidArgumentError("--draft-vocab must be >= 1 and needs a `draft` or `self` case to restrict")
    if kernels and amx:
        raise InvalidArgumentError("choose one of --kernels and --amx")
    say = progress if progress is not None else (lambda message: None)
    if threads is not None:
        torch.set_num_threads(threads)
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    torch.manual_seed(seed)
    target_model = GPT2LMHeadModel.from_pretrained(target, device=dev, dtype=dt)
    # Cases run in the order given, so a rerun in the reverse order can show whether a case's place in the run (the
    # first one timed, say) moves its baseline.
    drafts: dict[str, GPT2LMHeadModel] = {}
    names: dict[str, str] = {}
    for case in dict.fromkeys(cases):
        if case == "draft":
            drafts[case], names[case] = GPT2LMHeadModel.from_pretrained(draft, device=dev, dtype=dt), draft
            check_draft(target_model, drafts[case])
        elif case == "same":
            drafts[case], names[case] = target_model, target
        else:  # self
            n = self_layers if self_layers is not None else max(1, target_model.config.n_layer // 4)
            drafts[case], names[case] = target_model.first_layers(n), f"{target} first {n} layers"

    window = min(m.config.n_positions for m in (target_model, *drafts.values()))
    if batch > 1 and prompt_tokens + max_new_tokens > window:
        raise InvalidArgumentError(
            f"--batch needs --prompt-len + -n within the context window ({window}), "
            f"got {prompt_tokens + max_new_tokens}"
        )
    if draft_vocab is not None:
        tc = target_model.config
        keep = draft_vocabulary(draft_vocab, tc.vocab_size, draft_vocab_data, (tc.eos_token_id,))
        for case in ("draft", "self"):
            if case in drafts:
                drafts[case].restrict_vocab(keep)
    if kernels:  # after restrict_vocab, so the draft's smaller head goes through the kernel too
        toyllm_kernels.enable("--kernels", target_model, *drafts.values())
    if amx:
        for model in (target_model, *drafts.values()):  # a self draft's shared layers are converted once
            use_amx(model)

    if prompt_file is not None:
        stream = load_tokenizer(target).encode(_read_prompt_file(prompt_file))
        if len(stream) < prompt_tokens:
            raise InvalidArgumentError(f"{prompt_file} has {len(stream)} tokens, fewer than --prompt-len")
        tail = stream[-max(len(stream) // 20, prompt_tokens) :]  # the last 5%: text no training run saw
        starts = [round(s) for s in np.linspace(len(tail) - prompt_tokens, 0, prompts * batch)]  # the last first
        windows = [tail[s : s + prompt_tokens] for s in starts]
        units = [windows[i * batch : (i + 1) * batch] for i in range(prompts)]
        prompt_ids = [torch.tensor(u, dtype=torch.long, device=dev) for u in units]  # (batch, prompt_tokens) each
    else:
        generator = torch.Generator().manual_seed(seed)
        V = target_model.config.vocab_size
        shape = (batch, prompt_tokens)
        prompt_ids = [torch.randint(0, V, shape, generator=generator).to(dev) for _ in range(prompts)]

    def config(lookahead: int = 4, schedule: str = "constant") -> GenerationConfig:
        """Plain sampling without top-k, EOS ignored, so that every run makes exactly max_new_tokens."""
        return GenerationConfig(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=0,
            seed=seed,
            eos_token_id=None,
            lookahead=lookahead,
            max_lookahead=lookahead if schedule == "threshold" else max(16, lookahead),
            lookahead_schedule=schedule,
        )

    # Warm-up, untimed: every model and every K once, on the first prompt and the full length. First calls pay for
    # allocations and, on a GPU, for library handles and kernel choices per shape. At the full length, a constant
    # K's timed runs meet no verification width or cache length that the warm-up has not (a 16-token warm-up left
    # K = 16's 17-row forward and the longer caches to the first timed run). An H100 run without any warm-up timed
    # the same target's plain decoding 24% slower in its first case than in its second; first-use costs are one
    # candidate cause, not a proven one.
    with torch.inference_mode():
        for model in {id(m): m for m in (target_model, *drafts.values())}.values():  # each model once
            _timed_plain(model, prompt_ids[0], config())
        for model in drafts.values():
            for schedule in schedules:
                for K in lookaheads:
                    settings = config(K, schedule.removesuffix("-flat"))
                    _timed_speculative(target_model, model, prompt_ids[0], settings)
    rows, plain_runs = [], {}
    P = len(prompt_ids)
    for case, model in drafts.items():
        # Plain decoding is timed again for each case, and each prompt is decoded plainly and speculatively at every
        # K back to back, in the reverse order every other repeat: on a shared machine the speed drifts within
        # seconds, so the modes being compared should sample the same stretch of it. Each (prompt, mode) keeps its
        # fastest repeat (the one least disturbed by other work), and the totals add those up.
        say(f"case {case}: each prompt decoded plainly (target and draft), then speculatively; {repeats} time(s)")
        plain: list[Any] = [None] * P
        draft_plain: list[Any] = [None] * P
        runs = [(schedule, K) for schedule in schedules for K in lookaheads]
        best: dict[tuple[str, int], list[Any]] = {run: [None] * P for run in runs}
        matches = {run: True for run in runs}
        tasks: list[str | tuple[str, int]] = ["plain", *(["draft"] if case != "same" else []), *runs]
        for repeat in range(repeats):
            for i, ids in enumerate(prompt_ids):
                outputs: dict[tuple[str, int], torch.Tensor] = {}
                for task in tasks if repeat % 2 == 0 else tasks[::-1]:
                    if task == "plain":
                        reference, timing = _timed_plain(target_model, ids, config())
                        plain[i] = _faster(plain[i], timing, lambda r: r["seconds"])
                    elif task == "draft":
                        draft_run = _timed_plain(model, ids, config())[1]
                        draft_plain[i] = _faster(draft_plain[i], draft_run, lambda r: r["seconds"])
                    elif isinstance(task, tuple):
                        schedule, K = task
                        settings = config(K, schedule.removesuffix("-flat"))
                        flat = ThresholdSchedule(settings, verify_slope=0.0) if schedule == "threshold-flat" else None
                        outputs[task], spec, seconds = _timed_speculative(target_model, model, ids, settings, flat)
                        best[task][i] = _faster(best[task][i], (spec, seconds), lambda t: t[1])
                for key, out in outputs.items():  # every run, not only the fastest
                    matches[key] = matches[key] and torch.equal(out, reference)
        target_totals = _plain_totals(plain)
        draft_totals = target_totals if case == "same" else _plain_totals(draft_plain)
        plain_runs[case] = {"target": target_totals, "draft": draft_totals}
        c = draft_totals["step_seconds"] / target_totals["step_seconds"]
        for schedule, K in runs:
            spec = SpeculativeStats.total(t[0] for t in best[schedule, K])
            seconds = sum(t[1] for t in best[schedule, K])
            match = matches[schedule, K] if temperature == 0 else None
            rows.append(_row(case, names[case], K, schedule, spec, seconds, target_totals, c, match))
    results: dict[str, Any] = {
        "machine": describe_machine(dev),
        "settings": {
            "target": target,
            "draft": draft,
            "cases": list(drafts),
            "lookaheads": list(lookaheads),
            "schedules": list(schedules),
            "max_new_tokens": max_new_tokens,
            "prompt_tokens": prompt_tokens,
            "prompts": prompts,
            "batch": batch,
            "repeats": repeats,
            "temperature": temperature,
            "seed": seed,
            "dtype": str(next(target_model.parameters()).dtype),
            "kernels": kernels,
            "amx": amx,
            "prompt": str(prompt_file) if prompt_file is not None else "random ids",
            "draft_vocab": draft_vocab,
            "draft_vocab_data": str(draft_vocab_data) if draft_vocab_data is not None else None,
        },
        "plain": plain_runs,
        # The same target decoded plainly in every case: how far apart its baselines were (1.0: one case).
        "plain_spread": baseline_spread(plain_runs),
        "rows": rows,
    }
    if results["plain_spread"] > SPREAD_WARNING:
        say(
            f"warning: plain decoding of the target took {results['plain_spread']:.2f}x as long per token in one case"
            " as in another; each case's speedups are measured against its own baseline, so compare cases with care"
            " (or rerun)"
        )
    if out_dir is not None:
        folder = Path(out_dir)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "speculative.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        plot_speedup(results, folder / "speculative_speedup.png")
    return results


SPREAD_WARNING = 1.10  # plain baselines of one target further apart than this across cases get a warning


def baseline_spread(plain_runs: dict[str, dict[str, dict[str, float]]]) -> float:
    """Slowest over fastest plain decode step of the target across cases: the same target, prompts and settings each
    time, so anything above 1 is the machine moving. (An H100 run once timed the first case's baseline 24% slower
    than the second's, which may have made the first case's speedups look up to 24% better.)"""
    steps = [runs["target"]["step_seconds"] for runs in plain_runs.values()]
    return max(steps) / min(steps) if steps else 1.0


def _read_prompt_file(path: str | Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidArgumentError(f"cannot read the prompt file {path}: {exc}") from None


def plot_speedup(results: dict[str, Any], path: str | Path) -> None:
    """Measured decode speedup (solid; end to end as dots) and theoretical (dashed) against K, one colour per case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.5, 4.4))
    for i, case in enumerate(results["settings"]["cases"]):
        for j, schedule in enumerate(s for s in results["settings"].get("schedules", ["constant"]) if s != "constant"):
            adaptive = [r for r in results["rows"] if r["case"] == case and r.get("schedule") == schedule]
            ax.plot(
                [r["lookahead"] for r in adaptive],
                [r["decode_speedup"] for r in adaptive],
                "*^"[j % 2],
                markersize=9,
                color=f"C{i}",
                label=f"{case} `{schedule}` schedule (x: its max K), decoding",
            )
        rows = [r for r in results["rows"] if r["case"] == case and r.get("schedule", "constant") == "constant"]
        if not rows:
            continue
        ks = [r["lookahead"] for r in rows]
        label = f"{case} (alpha={rows[0]['alpha']:.2f}, c={rows[0]['cost_ratio']:.2f})"
        ax.plot(ks, [r["decode_speedup"] for r in rows], "o-", color=f"C{i}", label=f"{label} measured, decoding")
        ax.plot(ks, [r["speedup"] for r in rows], ".", color=f"C{i}", alpha=0.6, label=f"{case} measured, end to end")
        ax.plot(ks, [r["theoretical_speedup"] for r in rows], "x--", color=f"C{i}", label=f"{case} theory")
        ax.plot(
            ks,
            [r["theoretical_speedup_with_verify_cost"] for r in rows],
            "+:",
            color=f"C{i}",
            label=f"{case} theory, measured verify cost",
        )
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xlabel("lookahead K")
    ax.set_ylabel("speedup over plain KV decoding")
    batch = results["settings"].get("batch", 1)
    batches = f", batches of {batch}" if batch > 1 else ""
    ax.set_title(f"{results['settings']['target']}: speculative decoding{batches}")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))  # outside, clear of the lines
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_table(results: dict[str, Any]) -> str:
    """A Markdown table of the rows, for BENCHMARKS.md. The formula's columns are blank for adaptive schedules."""

    def times(x: float) -> str:
        return f"{x:.2f}x" if math.isfinite(x) else "-"

    header = [
        *("case", "schedule", "K", "mean K", "tokens/s spec", "tokens/s plain", "accepted/proposed", "alpha"),
        *("tokens/target fwd", "c", "v = verify/step", "speedup", "decode speedup", "theory", "decode / theory"),
        *("theory with v", "same output"),
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results["rows"]:
        theory = r["theoretical_speedup"]
        cells = [
            r["case"],
            r.get("schedule", "constant"),
            r["lookahead"],
            f"{r.get('mean_lookahead', math.nan):.2f}",
            f"{r['tokens_per_second']:.2f}",
            f"{r['plain_tokens_per_second']:.2f}",
            f"{r['acceptance_rate']:.3f}",
            f"{r['alpha']:.3f}",
            f"{r['tokens_per_target_forward']:.2f}",
            f"{r['cost_ratio']:.3f}",
            f"{r['verify_over_step']:.2f}",
            f"{r['speedup']:.2f}x",
            f"{r['decode_speedup']:.2f}x",
            times(theory),
            f"{r['decode_speedup'] / theory:.0%}" if math.isfinite(theory) else "-",
            times(r["theoretical_speedup_with_verify_cost"]),
            r["outputs_match"],
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":  # the same as `toyllm bench speculative ARGS`, which owns the flags
    import sys

    from toyllm.cli.main import run_app

    sys.exit(run_app(["bench", "speculative", *sys.argv[1:]]))
