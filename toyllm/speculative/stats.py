"""What a speculative run measures: proposals, acceptances, forwards and where the time went."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, fields


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


@dataclass
class SpeculativeStats:
    """Counters filled in round by round. A *round* is: the draft proposes k tokens, the target verifies them in one
    forward pass (a *verification forward*), and 1 to k + 1 tokens come out."""

    rounds: int = 0  # verification forwards of the target
    proposed: int = 0  # draft tokens proposed
    accepted: int = 0  # draft tokens accepted and emitted (a stop can cut a round's accepted drafts short)
    rejected: int = 0  # rounds that ended on a rejection that was reached (drafts after it were never judged)
    new_tokens: int = 0  # tokens emitted (accepted drafts + one residual/bonus token per round, cut at stops)
    target_forwards: int = 0  # verification forwards + prompt prefills (and re-prefills after a window slide)
    draft_forwards: int = 0  # every draft forward, its prompt prefill included
    draft_prefills: int = 0  # draft forwards that fed more than 2 tokens (the prompt, or the context after a slide)
    # The one-prompt decoder (decode.py) times each draft step up to the host's read of its token, and a greedy
    # verification up to the read of its argmaxes: on a GPU that read is the wait for the forward, and a synchronize
    # of its own only added to the round. Prefills, sampled verifications and a draft step the schedule discards end
    # at a synchronize. So there, draft steps include choosing their tokens (q too) and verifications include
    # processing their logits. The batch decoder (batch.py), which keeps its tokens on the device, synchronizes right
    # after each forward and times the forward alone.
    target_seconds: float = 0.0  # all target forwards (prefills too)
    verify_seconds: float = 0.0  # the verification forwards alone (one prompt: with processing their logits)
    draft_seconds: float = 0.0  # all draft forwards (one prompt: with choosing their tokens)
    draft_prefill_seconds: float = 0.0
    # Each model's first fill with the prompt, per generation: the target's prefill (the prompt but its last token)
    # and the draft's first forward (the whole prompt; it also yields the first proposal). Not decoding, see
    # `decode_seconds`; a window slide's refill later is decoding.
    prompt_forwards: int = 0
    prompt_seconds: float = 0.0
    total_seconds: float = 0.0  # wall time of the whole generation
    compactions: int = 0  # batches only: times the holes in the caches were closed (toyllm/speculative/batch.py)
    lookaheads: list[int] = field(default_factory=list)  # drafts proposed, per round
    # Drafts accepted, per round. In a batch: the fewest any row accepted (k where every row kept all it could use).
    # (What verification found: a stop that cut the round short does not lower it, unlike `accepted`.)
    accepted_per_round: list[int] = field(default_factory=list)

    @classmethod
    def total(cls, parts: Iterable[SpeculativeStats]) -> SpeculativeStats:
        """The counters of several generations added up (lists joined), as if one `SpeculativeStats` had seen them all.

        Why: a benchmark keeps each prompt's fastest run, so the runs it reports were counted separately.
        """
        out = cls()
        for part in parts:
            for f in fields(cls):
                setattr(out, f.name, getattr(out, f.name) + getattr(part, f.name))
        return out

    @property
    def acceptance_rate(self) -> float:
        """The fraction of proposed draft tokens that were accepted."""
        return _ratio(self.accepted, self.proposed)

    @property
    def alpha(self) -> float:
        """The per-token acceptance probability of the papers: accepted / (accepted + rejected).

        Lower `acceptance_rate` counts the drafts after a rejection, which were never judged, as failures; alpha
        counts only the drafts that were judged (the maximum-likelihood estimate if each is accepted independently
        with the same probability). This is the alpha of the speedup formula.
        """
        return _ratio(self.accepted, self.accepted + self.rejected)

    @property
    def tokens_per_round(self) -> float:
        """Mean tokens per target verification forward (plain decoding makes exactly 1)."""
        return _ratio(self.new_tokens, self.rounds)

    @property
    def cost_ratio(self) -> float:
        """c: the time of one draft decoding forward over one target verification forward, as measured."""
        draft_step = _ratio(self.draft_seconds - self.draft_prefill_seconds, self.draft_forwards - self.draft_prefills)
        return _ratio(draft_step, _ratio(self.verify_seconds, self.rounds))

    @property
    def decode_seconds(self) -> float:
        """Wall time after the prompt prefills: what the speedup formula models (it has no prompt phase)."""
        return self.total_seconds - self.prompt_seconds

    @property
    def other_seconds(self) -> float:
        """Time in neither model: the acceptance test (and p), stop checks, bookkeeping; in a batch, sampling too."""
        return self.total_seconds - self.target_seconds - self.draft_seconds

    def summary(self) -> dict[str, float | int]:
        """Flat numbers, for printing (`toyllm generate` shows them on stderr) and for JSON."""
        return {
            "rounds": self.rounds,
            "proposed": self.proposed,
            "accepted": self.accepted,
            "acceptance_rate": self.acceptance_rate,
            "alpha": self.alpha,
            "tokens_per_target_forward": self.tokens_per_round,
            "target_forwards": self.target_forwards,
            "draft_forwards": self.draft_forwards,
            "cost_ratio": self.cost_ratio,
            "target_seconds": self.target_seconds,
            "draft_seconds": self.draft_seconds,
            "other_seconds": self.other_seconds,
            "prompt_seconds": self.prompt_seconds,
        }
