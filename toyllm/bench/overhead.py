"""How much of a decode step is Python and operator dispatch rather than arithmetic and memory traffic?

Three measurements:

- `step_overhead`: the decode-step latency of a *twin* model with the same structure (layers, heads, the same
  operators in the same order) but a negligible width and vocabulary. Its arithmetic and memory traffic are ~0,
  so what remains is the fixed cost of launching ~15 operators per layer from Python, plus sampling.
- `step_allocations`: what the decode loop allocates per step, traced exactly. A preallocated cache means no
  allocation may be as large as a cache tensor, and the bytes per step must not grow with the position (growth by
  torch.cat would copy the whole cache every step).
- `decode_profile`: the operators that take the time in a decode step of any mode (torch.profiler).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from toyllm.bench.memory import trace_allocations
from toyllm.bench.modes import ToyllmMode
from toyllm.bench.runner import Mode, percentile, sync, time_generation
from toyllm.generation import GenerationConfig, stream_tokens
from toyllm.gpt2.model import GPT2LMHeadModel


def twin_model(model: GPT2LMHeadModel) -> GPT2LMHeadModel:
    """Same layers, heads and operators; width 2 per head and a vocabulary of 64: arithmetic ~0, dispatch the same."""
    param = next(model.parameters())
    cfg = dataclasses.replace(model.config, n_embd=2 * model.config.n_head, n_inner=None, vocab_size=64)
    return GPT2LMHeadModel(cfg).to(device=param.device, dtype=param.dtype).eval()


def step_overhead(
    model: GPT2LMHeadModel, batch_size: int = 1, new_tokens: int = 64, repeats: int = 3
) -> dict[str, Any]:
    """p50 decode-step latency of the real model and of its twin; their ratio is the share of pure overhead."""
    param = next(model.parameters())
    out: dict[str, Any] = {}
    for label, m in (("twin", twin_model(model)), ("model", model)):
        ids = torch.randint(0, m.config.vocab_size, (batch_size, 16), device=param.device)
        mode = ToyllmMode(label, m)
        time_generation(mode, ids, 8)  # warm-up
        latencies = [x for _ in range(repeats) for x in time_generation(mode, ids, new_tokens).decode_latencies()]
        out[f"{label}_step_ms_p50"] = 1e3 * percentile(latencies, 50)
        out[f"{label}_step_ms_min"] = 1e3 * min(latencies)
    out["overhead_fraction"] = out["twin_step_ms_p50"] / out["model_step_ms_p50"]
    return out


def _decode_loop(model: GPT2LMHeadModel, batch_size: int, prompt_len: int, steps: int) -> Any:
    """A started generation: prefill and the first token are done, `steps` decode steps remain."""
    ids = torch.randint(0, model.config.vocab_size, (batch_size, prompt_len), device=next(model.parameters()).device)
    config = GenerationConfig(max_new_tokens=steps + 1, temperature=0.0, eos_token_id=None)
    loop = stream_tokens(model, ids, config)
    next(loop)
    return loop


def step_allocations(model: GPT2LMHeadModel, batch_size: int = 1, prompt_len: int = 16, steps: int = 32) -> dict:
    """Allocations per decode step of `stream_tokens` (sampling included), early in a generation and `steps` later.

    Growing the cache with torch.cat would allocate a copy of the whole cache at every step, so the bytes allocated
    per step would grow by `2 * n_layer * batch * n_embd * element size` per position. With the preallocated cache
    they stay flat: `growth_per_position` must be a small fraction of `cat_growth_per_position`.
    """
    device = next(model.parameters()).device
    cfg = model.config
    loop = _decode_loop(model, batch_size, prompt_len, 3 * steps)
    early = trace_allocations(lambda: [next(loop) for _ in range(steps)], device)
    for _ in range(steps):  # move `steps` positions further
        next(loop)
    late = trace_allocations(lambda: [next(loop) for _ in range(steps)], device)
    cat_growth = 2 * cfg.n_layer * batch_size * cfg.n_embd * next(model.parameters()).element_size()
    growth = (late.allocated_bytes - early.allocated_bytes) / steps / (2 * steps)  # per step, per position later
    return {
        "steps": steps,
        "allocations_per_step": late.allocations / steps,
        "bytes_per_step_early": early.allocated_bytes / steps,
        "bytes_per_step_late": late.allocated_bytes / steps,
        "largest_allocation_bytes": max(early.largest_bytes, late.largest_bytes),
        "growth_per_position": growth,
        "cat_growth_per_position": cat_growth,
        "no_cache_growth": growth < 0.1 * cat_growth,
    }


def decode_profile(mode: Mode, input_ids: torch.Tensor, steps: int = 16, top: int = 10) -> list[dict[str, Any]]:
    """The operators with the most self time per decode step, for any mode (transformers' generate included).

    Two profiled runs: one of 1 + `steps` tokens and one of 1 token (prefill and first sampling only). Their
    per-operator difference is what the `steps` decode steps cost, without having to reach inside the loop.
    """
    from torch.profiler import ProfilerActivity

    from toyllm.bench.memory import quiet_profile

    device = input_ids.device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])

    def op_times(n: int) -> dict[str, tuple[float, int]]:
        with quiet_profile(activities=activities) as prof:
            mode.run(input_ids, n, lambda block: None)
            sync(device)
        return {e.key: (e.self_cpu_time_total, e.count) for e in prof.key_averages()}

    mode.run(input_ids, 2, lambda block: None)  # warm-up
    prefill, full = op_times(1), op_times(1 + steps)
    rows = []
    for op, (micros, count) in full.items():
        base_micros, base_count = prefill.get(op, (0.0, 0))
        rows.append((op, max(0.0, micros - base_micros), (count - base_count) / steps))
    total = sum(r[1] for r in rows)
    rows.sort(key=lambda r: r[1], reverse=True)
    return [
        {"op": op, "calls_per_step": calls, "self_ms_per_step": micros / 1e3 / steps, "share": micros / total}
        for op, micros, calls in rows[:top]
    ]
