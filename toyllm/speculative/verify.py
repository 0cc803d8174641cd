"""The acceptance rule of speculative sampling, as one pure function.

Given K draft tokens, the distributions q the draft sampled them from, and the target's distributions p at the same
K + 1 positions, decide how many drafts to keep and which token comes next:

    accept draft i with probability min(1, p_i(x_i) / q_i(x_i))      (stop at the first rejection)
    on a rejection at i:   next ~ normalize(max(0, p_i - q_i))        (the "residual" distribution)
    if all K are accepted: next ~ p_K                                   (the "bonus" token)

Why this is exact (Leviathan et al. 2023, Theorem 1; Chen et al. 2023): for one position, the chance of emitting
token x is  q(x) * min(1, p(x)/q(x))  +  P(reject) * residual(x)  =  min(q(x), p(x)) + max(0, p(x) - q(x))  =  p(x),
because P(reject) = sum_y max(0, q(y) - p(y)) = sum_y max(0, p(y) - q(y)) is exactly the residual's normaliser.
Applied position by position, every emitted token is distributed as the target would have sampled it.

At temperature 0, p and q are one-hots on the argmaxes, so the rule reduces to "keep the draft while it equals the
target's argmax, then emit the target's argmax": the output is the target's greedy output. `verify_greedy` is that
reduction, used at temperature 0 because it needs no (K, V) distributions at all (building one-hots and drawing from
them cost more per round than a small draft's forward).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One token from a (V,) probability vector (not necessarily normalised). Zero-probability tokens never come out."""
    return int(torch.multinomial(probs, num_samples=1, generator=generator).item())


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """normalize(max(0, p - q)) for (V,) vectors: what to sample after the draft's token was rejected.

    If p - q has no positive mass (p == q up to rounding), a rejection was a rounding accident: fall back to p.
    """
    residual = (p - q).clamp(min=0)
    total = residual.sum()
    return residual / total if total > 0 else p


def verify_drafts(
    drafts: torch.Tensor, q: torch.Tensor, p: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[int, int]:
    """Return (number of drafts accepted, the token that follows them).

    drafts: (K,) draft tokens; q: (K, V) the draft's distributions they were sampled from;
    p: (K + 1, V) the target's distributions at the same positions plus one (for the bonus token). K may be 0.
    One uniform number is drawn per draft, all at once, then one token from the residual or the bonus distribution.
    """
    K = drafts.shape[0]
    if K > 0:
        rows = torch.arange(K, device=drafts.device)
        p_x, q_x = p[rows, drafts], q[rows, drafts]  # (K,) probabilities of the drafted tokens
        u = torch.rand(K, generator=generator, device=p.device)
        # u < p/q, written without a division; q_x > 0 because x was sampled from q. When p_x >= q_x it always holds.
        accepted = (u * q_x < p_x).tolist()
        for i, ok in enumerate(accepted):
            if not ok:
                return i, draw(residual_distribution(p[i], q[i]), generator)
    return K, draw(p[K], generator)


def verify_greedy(drafts: Sequence[int] | torch.Tensor, target_tokens: Sequence[int] | torch.Tensor) -> tuple[int, int]:
    """`verify_drafts` for one-hot p and q: accept while a draft equals the target's argmax, then emit the argmax.

    drafts: (K,); target_tokens: (K + 1,) the target's greedy token at each position. With one-hots, p(x)/q(x) is 1
    when x is the target's argmax and 0 otherwise, and the residual max(0, p - q) is the one-hot on the argmax.
    Host ints are compared on the host: on a GPU each read of a device tensor is a sync.
    """
    draft_ids = drafts.tolist() if isinstance(drafts, torch.Tensor) else list(drafts)
    target_ids = target_tokens.tolist() if isinstance(target_tokens, torch.Tensor) else list(target_tokens)
    K = len(draft_ids)
    n = next((i for i in range(K) if draft_ids[i] != target_ids[i]), K)
    return n, int(target_ids[n])
