"""Training speed of toyllm's GPT-2 against `transformers.GPT2LMHeadModel`, same config and batch, one process.

    python -m toyllm.train.compare_hf --n-layer 6 --n-head 6 --n-embd 384 --block-size 256 --batch-size 8

Both models get the same weights-shaped config, the same batch, the same fused AdamW and the same step (forward,
cross-entropy, backward, clip, optimizer step). Steps alternate between the two models, so a machine that gets
busier or quieter during the run affects both alike, and the median step time of each is reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from toyllm.gpt2 import GPT2Config, GPT2LMHeadModel
from toyllm.train.optim import build_optimizer


def make_models(n_layer: int, n_head: int, n_embd: int, block_size: int, dropout: float) -> tuple[object, object]:
    import transformers

    torch.manual_seed(0)
    ours = GPT2LMHeadModel(
        GPT2Config(
            n_layer=n_layer,
            n_head=n_head,
            n_embd=n_embd,
            n_positions=block_size,
            resid_pdrop=dropout,
            embd_pdrop=dropout,
            attn_pdrop=dropout,
        )
    )
    hf_config = transformers.GPT2Config(
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
        n_positions=block_size,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
    )
    hf_config._attn_implementation = "sdpa"  # the fastest attention transformers offers on CPU too
    theirs = transformers.GPT2LMHeadModel(hf_config)
    return ours, theirs


def step_fn(model: torch.nn.Module, hf: bool, x: torch.Tensor, y: torch.Tensor, precision: str) -> Callable[[], float]:
    """One training step as the Trainer does it (for transformers: logits from its output object)."""
    optimizer = build_optimizer(model, 6e-4, 0.1)
    dtype = {"32": None, "bf16": torch.bfloat16}[precision]

    def step() -> float:
        with torch.autocast("cpu", dtype=dtype) if dtype else torch.autocast("cpu", enabled=False):
            out = model(input_ids=x) if hf else model(x)
            logits = out.logits if hf else out
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def compare(
    n_layer: int = 6,
    n_head: int = 6,
    n_embd: int = 384,
    block_size: int = 256,
    batch_size: int = 8,
    steps: int = 10,
    warmup: int = 2,
    dropout: float = 0.0,
    precision: str = "32",
) -> dict[str, float]:
    ours, theirs = make_models(n_layer, n_head, n_embd, block_size, dropout)
    ours.train()  # type: ignore[attr-defined]
    theirs.train()  # type: ignore[attr-defined]
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 50257, (batch_size, block_size + 1), generator=g)
    x, y = data[:, :-1], data[:, 1:]
    runs = {
        "toyllm": step_fn(ours, False, x, y, precision),  # type: ignore[arg-type]
        "transformers": step_fn(theirs, True, x, y, precision),  # type: ignore[arg-type]
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(warmup + steps):
        for name, step in runs.items():
            start = time.perf_counter()
            step()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    tokens = batch_size * block_size
    result = {f"{name}_tokens_per_s": tokens / statistics.median(t) for name, t in times.items()}
    result["speedup"] = result["toyllm_tokens_per_s"] / result["transformers_tokens_per_s"]
    result.update(
        n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, batch_size=batch_size, steps=steps
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-layer", type=int, default=6)
    parser.add_argument("--n-head", type=int, default=6)
    parser.add_argument("--n-embd", type=int, default=384)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--precision", choices=["32", "bf16"], default="32")
    args = parser.parse_args()
    result = compare(
        args.n_layer,
        args.n_head,
        args.n_embd,
        args.block_size,
        args.batch_size,
        args.steps,
        args.warmup,
        args.dropout,
        args.precision,
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
