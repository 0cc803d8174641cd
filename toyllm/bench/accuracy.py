"""What bf16 and int8 cost in accuracy, measured against the float32 model on the same tokens.

For every position of every window we compare the next-token distributions:

    top-1 agreement   how often both pick the same most likely token (greedy decoding follows the argmax)
    KL(fp32 || q)     nats of information lost by using the variant's distribution instead of fp32's
    perplexity        exp(mean NLL of the actual next token), for both: its change is the cost users feel

On an untrained (random) model all three are meaningless, since its distributions are nearly uniform; use a trained
checkpoint and held-out text (a `toyllm prepare` directory's val.bin, or a text file the model did not see).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from toyllm.gpt2.model import GPT2LMHeadModel


@torch.inference_mode()
def compare_to_reference(
    reference: GPT2LMHeadModel, variants: Mapping[str, nn.Module], tokens: torch.Tensor, window: int = 256
) -> list[dict[str, Any]]:
    """One row per variant. `tokens` is 1-D; it is cut into disjoint windows of `window` tokens."""
    device = next(reference.parameters()).device
    window = min(window, reference.config.n_positions, tokens.numel())
    n = tokens.numel() // window
    batches = tokens[: n * window].view(n, window).to(device)  # (n, window)
    sums: dict[str, dict[str, float]] = {name: {"agree": 0.0, "kl": 0.0, "nll": 0.0} for name in variants}
    ref_nll = 0.0
    count = 0
    for row in batches.split(8):  # 8 windows per forward
        targets = row[:, 1:]
        ref_logp = F.log_softmax(reference(row)[:, :-1].float(), dim=-1)  # (b, window - 1, V)
        ref_nll -= float(ref_logp.gather(-1, targets[..., None]).sum())
        count += targets.numel()
        for name, model in variants.items():
            logp = F.log_softmax(model(row)[:, :-1].float(), dim=-1)
            sums[name]["agree"] += float((logp.argmax(-1) == ref_logp.argmax(-1)).sum())
            sums[name]["kl"] += float((ref_logp.exp() * (ref_logp - logp)).sum())
            sums[name]["nll"] -= float(logp.gather(-1, targets[..., None]).sum())
    ref_ppl = math.exp(ref_nll / count)
    rows = []
    for name, s in sums.items():
        ppl = math.exp(s["nll"] / count)
        rows.append(
            {
                "variant": name,
                "tokens": count,
                "top1_agreement": s["agree"] / count,
                "kl_nats_per_token": s["kl"] / count,
                "perplexity_fp32": ref_ppl,
                "perplexity": ppl,
                "perplexity_change": ppl / ref_ppl - 1,
            }
        )
    return rows
