"""Sampling as pure functions over logits, with Hugging Face semantics and order.

A decode step turns the model's last logits (B, vocab) into the next tokens (B,):

    repetition_penalty -> temperature -> top_k -> top_p -> softmax -> multinomial

Each function takes logits and returns new logits (nothing is modified in place), so speculative decoding can run
the exact same pipeline on the draft's and the target's logits and compare the resulting distributions.
"""

from __future__ import annotations

import math

import torch

from toyllm import kernels
from toyllm.errors import InvalidArgumentError


def apply_repetition_penalty(
    logits: torch.Tensor, previous_ids: torch.Tensor, penalty: float, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Make every token already in `previous_ids` (prompt included) less likely, the CTRL/HF way.

    A seen token's logit is divided by `penalty` when positive and multiplied when negative, so penalty > 1 always
    pushes it down. logits: (B, V); previous_ids: (B, T); valid: (B, T) with 0 for left padding, which is not
    counted as "seen" (so a padded row behaves exactly like the same prompt alone).
    """
    if penalty == 1.0:
        return logits
    weight = torch.ones_like(previous_ids, dtype=logits.dtype) if valid is None else valid.to(logits.dtype)
    seen = torch.zeros_like(logits).scatter_add_(1, previous_ids, weight) > 0  # (B, V)
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Divide by T: T < 1 sharpens the distribution, T > 1 flattens it. T == 0 (greedy) is handled by `sample`."""
    if temperature in (0.0, 1.0):
        return logits
    return logits / temperature


def apply_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the k largest logits (and every logit tied with the k-th, as HF does); 0 disables."""
    if top_k <= 0 or top_k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, top_k).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus sampling: keep the smallest set of most likely tokens whose probability reaches top_p.

    Like HF we sort ascending and drop the tail whose cumulative probability is <= 1 - top_p, always keeping the
    most likely token.
    """
    if top_p >= 1.0:
        return logits
    sorted_logits, sorted_idx = torch.sort(logits, descending=False)  # (B, V) ascending
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - top_p)
    remove_sorted[..., -1:] = False
    remove = remove_sorted.scatter(1, sorted_idx, remove_sorted)  # back to vocabulary order
    return logits.masked_fill(remove, float("-inf"))


def process_logits(
    logits: torch.Tensor,
    previous_ids: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """The whole HF-ordered pipeline, in float32. With temperature 0 only the penalty applies (greedy)."""
    logits = logits.float()
    if previous_ids is not None:
        logits = apply_repetition_penalty(logits, previous_ids, repetition_penalty, valid)
    if temperature == 0.0:
        return logits
    logits = apply_temperature(logits, temperature)
    logits = apply_top_k(logits, top_k)
    return apply_top_p(logits, top_p)


def greedy(processed: torch.Tensor) -> torch.Tensor:
    """The argmax over the last dimension, (...,): the greedy token (the first one among exact ties, like torch).

    On the CPU this asks numpy, whose argmax is vectorized: torch's CPU argmax over a 50257-wide row took 0.1 to
    0.3 ms on the reference machine, a visible share of a small model's decode step, and numpy's about 0.012 ms.
    Where toyllm's CPU kernel is loaded anyway (a model decoding through it), its `argmax_rows` splits the rows over
    every thread instead (toyllm/kernels/argmax.cpp): 9 verification rows took numpy 0.25 ms on a 2-core Xeon.
    Both return the first index of the largest value, or of the first NaN, as torch does.
    """
    if processed.device.type == "cpu" and processed.dtype == torch.float32 and kernels.is_loaded():
        rows = processed.detach().reshape(-1, processed.shape[-1]).contiguous()  # (M, V)
        return torch.ops.toyllm.argmax_rows(rows).view(processed.shape[:-1])
    if processed.device.type == "cpu" and processed.dtype in (torch.float32, torch.float64):
        return torch.as_tensor(processed.detach().contiguous().numpy().argmax(axis=-1), dtype=torch.long)
    return processed.argmax(dim=-1)


def logits_to_probs(processed: torch.Tensor, temperature: float) -> torch.Tensor:
    """The distribution a token is drawn from. Greedy (temperature 0) is a one-hot on the argmax."""
    if temperature == 0.0:
        return torch.nn.functional.one_hot(greedy(processed), processed.size(-1)).to(processed.dtype)
    return torch.softmax(processed, dim=-1)


def sample(processed: torch.Tensor, temperature: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token per row (B,) from processed logits (B, V)."""
    if temperature == 0.0:
        return greedy(processed)
    return sample_probs(torch.softmax(processed, dim=-1), generator)


def sample_probs(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token per row (B,) from probabilities (B, V): `sample` after its softmax, for a caller that keeps the
    distribution (speculative decoding's q) and so need not compute it twice."""
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def validate_seed(seed: int | None) -> None:
    """A seed torch's generators can take (None: unseeded); beyond that range torch fails with a bare overflow."""
    if seed is not None and not -(2**63) <= seed < 2**64:
        raise InvalidArgumentError(f"seed must be in -2**63..2**64 - 1, got {seed}")


def validate_sampling(temperature: float, top_k: int, top_p: float, repetition_penalty: float) -> None:
    """Reject values that would silently produce garbage, with a message that says the allowed range."""
    if not 0 <= temperature < math.inf:  # also catches NaN; inf would divide every logit to 0 (and -inf ones to NaN)
        raise InvalidArgumentError(f"temperature must be a finite number >= 0 (0 means greedy), got {temperature}")
    if top_k < 0:
        raise InvalidArgumentError(f"top_k must be >= 0 (0 disables it), got {top_k}")
    if not 0 < top_p <= 1:
        raise InvalidArgumentError(f"top_p must be in (0, 1], got {top_p}")
    if not 0 < repetition_penalty < math.inf:
        raise InvalidArgumentError(
            f"repetition_penalty must be a finite number > 0 (1 disables it), got {repetition_penalty}"
        )
