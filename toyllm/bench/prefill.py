"""Chunked prefill: the same logits as a one-shot prefill, with a fraction of the peak activation memory.

A one-shot prefill of L tokens holds the activations of all L positions at once (the MLP's (L, 4C) hidden layer is
the largest). Prefilling in chunks of c tokens, each chunk attending to the cache plus itself, only ever holds c
rows of activations, so the peak falls roughly by L / c while the arithmetic is the same. The cache itself is
allocated before either run and is not counted: it is the same in both.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from toyllm.bench.memory import trace_allocations
from toyllm.bench.runner import sync
from toyllm.generation import prefill
from toyllm.gpt2.model import GPT2LMHeadModel
from toyllm.kv_cache import KVCache


def chunked_prefill_memory(
    model: GPT2LMHeadModel, prompt_len: int = 1024, chunk_size: int = 256, batch_size: int = 1, seed: int = 0
) -> dict[str, Any]:
    """Peak bytes that torch allocated during each prefill (above the cache), their times, and the logits gap."""
    param = next(model.parameters())
    prompt_len = min(prompt_len, model.config.n_positions)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch_size, prompt_len), generator=generator).to(param.device)
    cache = KVCache.for_model(model, batch_size, prompt_len)
    logits: dict[str, torch.Tensor] = {}
    out: dict[str, Any] = {"prompt_len": prompt_len, "chunk_size": chunk_size, "batch_size": batch_size}
    for label, chunk in (("one_shot", None), ("chunked", chunk_size)):

        def run(label: str = label, chunk: int | None = chunk) -> None:
            cache.reset()
            with torch.inference_mode():
                logits[label] = prefill(model, cache, ids, chunk_size=chunk)

        run()  # warm-up: first-call allocations (thread pools, kernels) are not the prefill's
        del logits[label]  # freed now, not inside the trace (where it would be a free of an unknown block)
        trace = trace_allocations(run, param.device)
        sync(param.device)
        start = time.perf_counter()
        run()
        sync(param.device)
        out[f"{label}_seconds"] = time.perf_counter() - start
        out[f"{label}_peak_bytes"] = trace.peak_bytes
    out["cache_bytes"] = cache.nbytes
    out["peak_reduction"] = 1 - out["chunked_peak_bytes"] / out["one_shot_peak_bytes"]
    diff = (logits["one_shot"].float() - logits["chunked"].float()).abs().max()
    out["max_abs_logit_diff"] = float(diff)
    out["same_argmax"] = bool(torch.equal(logits["one_shot"].argmax(-1), logits["chunked"].argmax(-1)))
    return out
