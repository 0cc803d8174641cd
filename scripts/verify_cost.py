"""What a speculative verification forward costs next to one decoding step, per form of the attention mask.

The speedup formula prices a forward over K + 1 tokens at one target step (v = 1). On a GPU a small model is bound
by kernel launches, so v is set by how many kernels (and how much Python) a multi-token forward adds: this script
times a forward of T tokens over a cache of `--past` tokens, for T = 1 and T = K + 1, with the bottom-right causal
mask given to SDPA in three forms (the library's additive float mask built once per forward, a dense bool mask,
which SDPA converts in every layer, and SDPA's `causal_lower_right` object), and a plain greedy decoding step for
reference. Outside CI:

    python scripts/verify_cost.py --device cuda            # 6-layer, 384-wide random model (the trained pair's shape)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.nn.attention.bias import causal_lower_right

import toyllm.gpt2.model as model_module
from toyllm.generation import GenerationConfig, GenerationStats, _sync, generate
from toyllm.gpt2.config import GPT2Config
from toyllm.gpt2.model import GPT2LMHeadModel
from toyllm.kv_cache import KVCache

MaskFn = Callable[..., tuple[Any, bool]]
_default: MaskFn = model_module.build_attention_mask


def _lower_right(T: int, past: int, key_padding: Any, device: torch.device, dtype: Any = None) -> tuple[Any, bool]:
    """SDPA's mask object (flash / memory-efficient kernels align it natively); not in the library, as it breaks
    torch.compile(fullgraph=True) and autocast's dtype handling."""
    if key_padding is not None or past == 0 or T == 1:
        return _default(T, past, key_padding, device)
    return causal_lower_right(T, past + T), False


def _dense_bool(T: int, past: int, key_padding: Any, device: torch.device, dtype: Any = None) -> tuple[Any, bool]:
    """The library's form up to the eleventh session: SDPA converts a bool mask to an additive one in every layer."""
    if key_padding is not None or past == 0 or T == 1:
        return _default(T, past, key_padding, device)
    return torch.ones(T, past + T, dtype=torch.bool, device=device).tril(diagonal=past), False  # (T, S)


MASKS: dict[str, MaskFn] = {"library": _default, "dense-bool": _dense_bool, "lower-right": _lower_right}


def time_forms(model: GPT2LMHeadModel, T: int, past: int, repeats: int) -> dict[str, float]:
    """Median seconds of one forward of T tokens over a cache of `past` tokens, per mask form, synced as the decoder
    syncs. The forms take turns, in an order rotated every repeat, so that the machine's drift hits them alike."""
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (1, past + T), device=device)
    cache = KVCache.for_model(model, 1, max_len=past + T)
    model(ids[:, :past], cache=cache, logits_to_keep=1)
    names = list(MASKS)
    times: dict[str, list[float]] = {name: [] for name in names}
    try:
        for r in range(repeats):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                model_module.build_attention_mask = MASKS[name]
                cache.truncate(past)
                _sync(device)
                start = time.perf_counter()
                model(ids[:, past:], cache=cache, logits_to_keep=T)
                _sync(device)
                times[name].append(time.perf_counter() - start)
    finally:
        model_module.build_attention_mask = _default
    return {name: statistics.median(t) for name, t in times.items()}


def time_plain_step(model: GPT2LMHeadModel, past: int, new: int) -> float:
    """Seconds per decoding step of plain greedy decoding (forward, sampling, stop checks), the prompt's prefill of
    `past` tokens left out, as the speculative bench counts a step."""
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (1, past), device=device)
    config = GenerationConfig(max_new_tokens=new, temperature=0.0, eos_token_id=None)
    generate(model, ids, config)  # warm-up
    best = float("inf")
    for _ in range(3):
        stats = GenerationStats()
        generate(model, ids, config, stats=stats)
        best = min(best, stats.decode_seconds / (stats.new_tokens - 1))  # the first token comes from the prefill
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--past", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--out", default=None, help="write the numbers as JSON here")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = GPT2Config(n_layer=args.layers, n_head=args.heads, n_embd=args.width)
    model = GPT2LMHeadModel(config).to(args.device).eval()
    results: dict[str, Any] = {"device": str(args.device), "past": args.past}
    if args.device.startswith("cuda"):
        results["device"] = torch.cuda.get_device_name()
    with torch.inference_mode():
        step = time_plain_step(model, args.past, 64)
        results["plain_step_ms"] = 1e3 * step
        one = time_forms(model, 1, args.past, args.repeats)["library"]  # one token: no mask in any form
        results["forward_T1_ms"] = 1e3 * one
        print(f"plain greedy step {1e3 * step:.3f} ms; forward of 1 token {1e3 * one:.3f} ms")
        for T in (3, 5, 9):
            for name, t in time_forms(model, T, args.past, args.repeats).items():
                results[f"{name}_T{T}_ms"] = 1e3 * t
                print(f"{name:12s} T={T}: {1e3 * t:.3f} ms = {t / one:.2f} x one token = {t / step:.2f} x a step")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
