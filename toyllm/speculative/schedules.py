"""How many tokens the draft proposes per round (the lookahead K), and when it stops early.

Three schedules, chosen by `GenerationConfig.lookahead_schedule`:

* `constant`: K = `lookahead` every round.
* `heuristic`: start at `lookahead`; +2 after a round where every draft was accepted, -1 (never below 1) otherwise,
  capped at `max_lookahead`. This is the rule of Hugging Face `transformers` ("heuristic" assistant schedule).
* `threshold`: up to `max_lookahead` drafts, but the draft stops as soon as its own confidence in the next token
  (its top probability m) falls below a threshold. The threshold is tuned online (see `ThresholdSchedule`).

A schedule only changes *how many* tokens are proposed, never how they are verified, so no schedule can change the
output distribution (or the greedy output).
"""

from __future__ import annotations

from toyllm.generation import GenerationConfig


class LookaheadSchedule:
    """The interface the decoder uses. Subclasses override what they need."""

    # Does `keep_drafting` / `update` read the draft's confidence? Computing it costs a softmax over the vocabulary
    # per draft token, so schedules that ignore it say so and get NaN instead.
    uses_confidence = True

    def __init__(self, config: GenerationConfig) -> None:
        self.lookahead = config.lookahead  # the most drafts the next round may propose

    def start_round(self) -> None:
        """Called before the draft proposes its first token of a round."""

    def keep_drafting(self, index: int, confidence: float) -> bool:
        """May the draft propose its token number `index` (1-based), whose top probability is `confidence`?

        Asked before every draft token; the answer for index 1 is ignored (a round always proposes one draft).
        """
        return True

    def update(self, proposed: int, accepted: int, confidences: list[float], cost_ratio: float | None) -> None:
        """Learn from a finished round: `proposed` drafts, of which the first `accepted` were kept.

        `confidences[i]` is the draft's top probability for draft i + 1; `cost_ratio` is the measured time of one
        draft forward divided by one target forward (None until both have been timed).
        """


class ConstantSchedule(LookaheadSchedule):
    """K never changes."""

    uses_confidence = False


class HeuristicSchedule(LookaheadSchedule):
    """+2 after a fully accepted round, -1 otherwise (at least 1, at most `max_lookahead`)."""

    uses_confidence = False

    def __init__(self, config: GenerationConfig) -> None:
        super().__init__(config)
        self.max_lookahead = config.max_lookahead

    def update(self, proposed: int, accepted: int, confidences: list[float], cost_ratio: float | None) -> None:
        if proposed == 0:
            return  # a round cut short by max_new_tokens or the context window says nothing about the draft
        if accepted == proposed:
            self.lookahead = min(self.max_lookahead, self.lookahead + 2)
        else:
            self.lookahead = max(1, self.lookahead - 1)


class ThresholdSchedule(LookaheadSchedule):
    """Stop drafting when the draft is unsure; learn from the observed acceptance where "unsure" begins.

    Cost model, in units of one target forward: a round with k drafts costs 1 + c*k, where c is the measured
    draft/target cost ratio. Let R be the throughput so far (tokens per unit of cost). Drafting token i costs c and
    pays off only if drafts 1..i are all accepted, so it is worth its cost when

        A_i = a(m_1) * a(m_2) * ... * a(m_i)  >=  c * R                                          (the rule)

    where a(m) is the probability that a draft token whose top probability is m gets accepted (given that the ones
    before it were). Proposing exactly the tokens that beat the current average rate is what raises the average
    (the marginal-value argument), so the rule maximises expected tokens per unit time, one decision at a time.

    a(m) is learnt online: 10 bins over m in [0, 1], each counting verified drafts and acceptances, starting from a
    prior of 2 pseudo-observations at a(m) = m (a calibrated draft), then made non-decreasing in m. Since a is
    monotone, the rule is a confidence threshold on the draft's own top probability: the draft stops at the first
    i >= 2 with m_i < tau_i = a^-1(c * R / A_{i-1}). `threshold` reports tau_1 = a^-1(c * R).
    Until c has been measured (the first round), the fixed starting threshold `confidence_threshold` is used.
    """

    BINS = 10
    PRIOR = 2.0  # pseudo-observations per bin

    def __init__(self, config: GenerationConfig, cost_ratio: float | None = None) -> None:
        super().__init__(config)
        self.lookahead = config.max_lookahead
        self.threshold = config.confidence_threshold
        self.fixed_cost_ratio = cost_ratio  # tests pass one, so that K does not depend on wall-clock time
        self.cost_ratio: float | None = cost_ratio
        self.tokens = 0.0  # tokens emitted so far
        self.cost = 0.0  # their cost, in target forwards
        centers = [(b + 0.5) / self.BINS for b in range(self.BINS)]
        self.verified = [self.PRIOR] * self.BINS
        self.accepted = [self.PRIOR * c for c in centers]
        self._survival = 1.0  # A_{i-1} of the current round

    # -- the calibration curve a(m) -----------------------------------------------------------------------------

    def _bin(self, m: float) -> int:
        return min(self.BINS - 1, max(0, int(m * self.BINS)))

    def acceptance_curve(self) -> list[float]:
        """a(m) per bin, made non-decreasing by a running maximum (a more confident draft is not worse)."""
        curve, best = [], 0.0
        for acc, n in zip(self.accepted, self.verified, strict=True):
            best = max(best, acc / n)
            curve.append(best)
        return curve

    def _break_even(self) -> float | None:
        """c * R: the acceptance a token must beat to pay for itself; None before c is known."""
        if self.cost_ratio is None:
            return None
        rate = self.tokens / self.cost if self.cost > 0 else 1.0  # plain decoding makes 1 token per target forward
        return self.cost_ratio * rate

    # -- the decoder's questions -------------------------------------------------------------------------------

    def start_round(self) -> None:
        self._survival = 1.0

    def keep_drafting(self, index: int, confidence: float) -> bool:
        need = self._break_even()
        if need is None:
            return confidence >= self.threshold or index == 1
        a = self.acceptance_curve()[self._bin(confidence)]
        if index > 1 and self._survival * a < need:
            return False
        self._survival *= a
        return True

    def update(self, proposed: int, accepted: int, confidences: list[float], cost_ratio: float | None) -> None:
        # Drafts 1..accepted were accepted; draft accepted + 1 (if any) was rejected; later ones were never judged.
        for i, m in enumerate(confidences[: min(proposed, accepted + 1)]):
            b = self._bin(m)
            self.verified[b] += 1
            self.accepted[b] += 1.0 if i < accepted else 0.0
        if self.fixed_cost_ratio is None and cost_ratio is not None:
            self.cost_ratio = cost_ratio
        c = self.cost_ratio if self.cost_ratio is not None else 0.0
        self.tokens += accepted + 1
        self.cost += 1 + c * proposed
        need = self._break_even()
        if need is not None:  # report tau_1 = a^-1(c * R): the lower edge of the first bin that beats it
            curve = self.acceptance_curve()
            self.threshold = next((b / self.BINS for b, a in enumerate(curve) if a >= need), 1.0)


def make_schedule(config: GenerationConfig, cost_ratio: float | None = None) -> LookaheadSchedule:
    """The schedule named by `config.lookahead_schedule`. `cost_ratio` fixes c for the threshold schedule."""
    if config.lookahead_schedule == "heuristic":
        return HeuristicSchedule(config)
    if config.lookahead_schedule == "threshold":
        return ThresholdSchedule(config, cost_ratio)
    return ConstantSchedule(config)
