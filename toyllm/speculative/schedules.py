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

import math
import time
from collections.abc import Sequence

from toyllm.generation import GenerationConfig


class LookaheadSchedule:
    """The interface the decoders use. Subclasses override what they need.

    The one-prompt decoder asks `keep_drafting` and calls `update`; the batch decoder, which picks one k for all
    its rows, asks `keep_drafting_rows` and calls `update_rows` with every live row's numbers. By default those
    reduce to `keep_drafting` with the most confident row and to `update` with the row that kept fewest drafts;
    `ThresholdSchedule` uses every row.
    """

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

    def keep_drafting_rows(self, index: int, confidences: Sequence[float]) -> bool:
        """`keep_drafting` for a batch: `confidences` has one entry per live row."""
        return self.keep_drafting(index, max(confidences))

    def update(
        self,
        proposed: int,
        accepted: int,
        confidences: list[float],
        cost_ratio: float | None,
        verify_seconds: float | None = None,
    ) -> None:
        """Learn from a finished round: `proposed` drafts, of which the first `accepted` were kept.

        `confidences[i]` is the draft's top probability for draft i + 1; `cost_ratio` is the measured time of one
        draft step divided by one target verification (None until both have been timed; `SpeculativeStats` says
        what each includes); `verify_seconds` is how long this round's verification took (None where it was not
        timed).
        """

    def update_rows(
        self,
        proposed: int,
        fewest: int,
        accepted: Sequence[int],
        confidences: Sequence[Sequence[float]],
        cost_ratio: float | None,
        verify_seconds: float | None = None,
    ) -> None:
        """`update` for a batch: per live row, the drafts it kept and the confidences of the drafts it could use.

        `fewest` is the fewest any row kept (a row that kept every draft it could use counting as `proposed`).
        """
        self.update(proposed, fewest, [], cost_ratio, verify_seconds)


class ConstantSchedule(LookaheadSchedule):
    """K never changes."""

    uses_confidence = False


class HeuristicSchedule(LookaheadSchedule):
    """+2 after a fully accepted round, -1 otherwise (at least 1, at most `max_lookahead`)."""

    uses_confidence = False

    def __init__(self, config: GenerationConfig) -> None:
        super().__init__(config)
        self.max_lookahead = config.max_lookahead

    def update(
        self,
        proposed: int,
        accepted: int,
        confidences: list[float],
        cost_ratio: float | None,
        verify_seconds: float | None = None,
    ) -> None:
        if proposed == 0:
            return  # a round cut short by max_new_tokens or the context window says nothing about the draft
        if accepted == proposed:
            self.lookahead = min(self.max_lookahead, self.lookahead + 2)
        else:
            self.lookahead = max(1, self.lookahead - 1)


class VerifyCost:
    """What the target's verification forward costs as a function of k, the drafts it scores, learnt online.

    The paper's cost model takes a verification forward as one target forward whatever k is: true where decoding is
    memory-bound (a GPU). On a CPU each of the k + 1 scored rows adds arithmetic, and for a batch of B rows
    B * (k + 1) rows do, with a jump where a product leaves the CPU kernel for torch's GEMM
    (docs/speculative_bench.md). So the schedule learns the curve v(k) from the rounds it has timed, in units of
    their mean (the unit c is measured in):

    * v is non-decreasing in k (scoring more rows never makes a forward cheaper): a running maximum over k;
    * each v(k) is the mean of the forwards timed with k drafts, plus PRIOR pseudo-observations at v(k - 1).

    The prior is optimistic on purpose: a k never timed costs what k - 1 costs, so the schedule tries it, and then
    knows. (A line through the timed points would price an untried k between a cheap small k and a costly large
    one by interpolation, overestimate it, and never try it.) The k-th draft adds `marginal(k) = v(k) - v(k - 1)`
    to its round; before anything is timed that is 0, the paper's model.
    """

    PRIOR = 2.0  # pseudo-observations at v(k - 1), per k

    def __init__(self, slope: float | None = None) -> None:
        # Fixed v(k) = 1 + slope * k: tests (so K does not depend on wall-clock time) and the bench's
        # `threshold-flat` ablation (slope 0, the paper's model).
        self.fixed_slope = slope
        self.count: dict[int, int] = {}
        self.seconds: dict[int, float] = {}
        self._curve: list[float] = []  # v(0), v(1), ...: recomputed after each new timing

    def add(self, k: int, seconds: float) -> None:
        """One timed verification forward that scored k drafts."""
        self.count[k] = self.count.get(k, 0) + 1
        self.seconds[k] = self.seconds.get(k, 0.0) + seconds
        self._curve = []

    @property
    def unit(self) -> float | None:
        """The mean timed verification forward, in seconds (None before one was timed)."""
        n = sum(self.count.values())
        return sum(self.seconds.values()) / n if n else None

    def curve(self, up_to: int) -> list[float]:
        """v(0) .. v(up_to) in units of the mean timed forward (all 1.0 before anything was timed)."""
        if self.fixed_slope is not None:
            return [1.0 + self.fixed_slope * k for k in range(up_to + 1)]
        if not self.count:
            return [1.0] * (up_to + 1)
        if len(self._curve) <= up_to:
            unit = self.unit
            assert unit is not None  # something was timed
            smallest = min(self.count)
            previous = self.seconds[smallest] / self.count[smallest]  # below the smallest k timed: flat
            curve = []
            for k in range(max(up_to, max(self.count)) + 1):
                value = (self.seconds.get(k, 0.0) + self.PRIOR * previous) / (self.count.get(k, 0) + self.PRIOR)
                previous = max(previous, value)
                curve.append(previous / unit)
            self._curve = curve
        return self._curve[: up_to + 1]

    def marginal(self, k: int) -> float:
        """What the k-th draft (k >= 1) adds to a round's verification, in mean verification forwards."""
        curve = self.curve(k)
        return curve[k] - curve[k - 1]


class ThresholdSchedule(LookaheadSchedule):
    """Stop drafting when the draft is unsure; learn from the observed acceptance where "unsure" begins.

    Cost model, in units of the mean verification forward: a round with k drafts costs v(k) + c*k, where c is one
    draft step (as timed between two of the decoder's `keep_drafting` questions: the forward and the processing
    around it) and v(k) the verification forward's cost, learnt online (`VerifyCost`; 1 in the paper's model). Let
    R be the throughput so far: tokens per unit of measured round time (all of it: drafts, verification,
    bookkeeping). Drafting token i costs c + dv_i (dv_i = v(i) - v(i - 1)) and pays a token only if drafts 1..i are
    all accepted, so it is worth its cost when

        A_i = a(m_1) * a(m_2) * ... * a(m_i)  >=  (c + dv_i) * R                                 (the rule)

    where a(m) is the probability that a draft token whose top probability is m gets accepted (given that the ones
    before it were). Proposing exactly the tokens that beat the current average rate is what raises the average
    (the marginal-value argument), so the rule maximises expected tokens per unit time, one decision at a time.
    In a batch (one k for every row) draft i pays each live row its A_i, so the sum over the live rows is what must
    beat (c + dv_i) * R * rows, with R the rate per live row (`rate`); a row with no room for draft i brings nothing.

    a(m) is learnt online: 10 bins over m in [0, 1], each counting verified drafts and acceptances, starting from a
    prior of 2 pseudo-observations at a(m) = m (a calibrated draft), then made non-decreasing in m. Since a is
    monotone, the rule is a confidence threshold on the draft's own top probability: the draft stops at the first
    i >= 2 with m_i < tau_i = a^-1((c + dv_i) * R / A_{i-1}). `threshold` reports tau_1 = a^-1((c + dv_1) * R) (per
    row, for a batch). Until c has been measured (the first round), rounds propose at most FIRST_DRAFTS drafts and
    stop below the fixed starting threshold `confidence_threshold`. With a fixed `cost_ratio` (and `verify_slope`),
    R's cost is the model v(k) + c*k and nothing depends on the clock: what the tests use.
    """

    BINS = 10
    PRIOR = 2.0  # pseudo-observations per bin
    # Drafts per round until c is measured (the draft's first forward is its prompt, so two are needed to time a
    # step). Starting low matters on a CPU: v(k) is learnt optimistically upward from the smallest k timed.
    FIRST_DRAFTS = 2

    def __init__(
        self, config: GenerationConfig, cost_ratio: float | None = None, verify_slope: float | None = None
    ) -> None:
        super().__init__(config)
        self.lookahead = config.max_lookahead
        self.threshold = config.confidence_threshold
        self.fixed_cost_ratio = cost_ratio  # tests pass one, so that K does not depend on wall-clock time
        self.cost_ratio: float | None = cost_ratio
        self.verify_cost = VerifyCost(verify_slope)  # likewise; verify_slope=0.0 is the paper's model
        self.tokens = 0.0  # tokens emitted so far (every row's)
        self._row_seconds = 0.0  # what they cost: each round's seconds times its live rows (see `rate`)
        centers = [(b + 0.5) / self.BINS for b in range(self.BINS)]
        self.verified = [self.PRIOR] * self.BINS
        self.accepted = [self.PRIOR * c for c in centers]
        self._survival: list[float] = []  # A_{i-1} of the current round, per row
        self._round_start = self._last_question = time.perf_counter()
        self._draft_steps, self._draft_step_seconds = 0, 0.0  # the time between two questions: one draft step

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

    @property
    def rate(self) -> float:
        """R for one row: tokens per live row per mean verification forward so far (1 before any round, as plain
        decoding makes one token per row per target forward).

        Per row because a batch's rows finish at different times: the rule multiplies it by the rows still live, so
        a batch down to its last row is not held to the rate all of its rows made together. Rounds are priced in
        seconds and converted with the current mean verification forward, so early and late rounds share one unit.
        """
        return self.tokens / self.cost if self._row_seconds > 0 else 1.0

    @property
    def cost(self) -> float:
        """The rounds' cost so far in mean verification forwards, each counted once per live row."""
        return self._row_seconds / self._unit()

    def _unit(self) -> float:
        """Seconds per mean verification forward while timings are live; 1 with a fixed c, whose modelled costs
        are already in that unit (so that nothing depends on the clock)."""
        unit = self.verify_cost.unit
        return unit if unit is not None and self.fixed_cost_ratio is None else 1.0

    def _break_even(self, index: int, rows: int = 1) -> float | None:
        """(c + dv_index) * R for `rows` live rows: the expected tokens draft `index` must bring; None before c."""
        if self.cost_ratio is None:
            return None
        return (self.cost_ratio + self.verify_cost.marginal(index)) * self.rate * rows

    # -- the decoder's questions -------------------------------------------------------------------------------

    def start_round(self) -> None:
        self._survival = []
        self._round_start = time.perf_counter()

    def keep_drafting(self, index: int, confidence: float) -> bool:
        return self.keep_drafting_rows(index, [confidence])

    def keep_drafting_rows(self, index: int, confidences: Sequence[float]) -> bool:
        """A NaN confidence marks a row that cannot use draft `index` (it has fewer tokens left): it brings nothing."""
        now = time.perf_counter()
        if index > 1:  # since question index - 1: a token written, a draft forward, its logits processed
            self._draft_steps += 1
            self._draft_step_seconds += now - self._last_question
        self._last_question = now
        if index == 1:
            self._survival = [1.0] * len(confidences)
        need = self._break_even(index, len(confidences))
        if need is None:  # c not measured yet: the starting threshold, and few drafts, so v(k) is learnt upward
            sure = [m for m in confidences if not math.isnan(m)]
            return index == 1 or (index <= self.FIRST_DRAFTS and bool(sure) and max(sure) >= self.threshold)
        a = self.acceptance_curve()
        survival = [
            0.0 if math.isnan(m) else s * a[self._bin(m)]
            for s, m in zip(self._survival, confidences, strict=True)  # the same rows all round
        ]
        if index > 1 and sum(survival) < need:
            return False
        self._survival = survival
        return True

    def update(
        self,
        proposed: int,
        accepted: int,
        confidences: list[float],
        cost_ratio: float | None,
        verify_seconds: float | None = None,
    ) -> None:
        self.update_rows(proposed, accepted, [accepted], [confidences], cost_ratio, verify_seconds)

    def update_rows(
        self,
        proposed: int,
        fewest: int,  # (unused: this schedule hears every row)
        accepted: Sequence[int],
        confidences: Sequence[Sequence[float]],
        cost_ratio: float | None,
        verify_seconds: float | None = None,
    ) -> None:
        self._learn_acceptance(accepted, confidences)
        self._learn_costs(proposed, len(accepted), sum(kept + 1 for kept in accepted), cost_ratio, verify_seconds)
        self._report_threshold()

    def _learn_acceptance(self, accepted: Sequence[int], confidences: Sequence[Sequence[float]]) -> None:
        """a(m): per row, drafts 1..kept were accepted, draft kept + 1 (if the row could use it) was rejected, and
        later ones were never judged."""
        for kept, row in zip(accepted, confidences, strict=True):
            for i, m in enumerate(row[: kept + 1]):
                b = self._bin(m)
                self.verified[b] += 1
                self.accepted[b] += 1.0 if i < kept else 0.0

    def _learn_costs(
        self, proposed: int, rows: int, tokens: int, cost_ratio: float | None, verify_seconds: float | None
    ) -> None:
        """v(k), c and R's running totals from a finished round of `rows` live rows that emitted `tokens`."""
        # Measured round time for R once c is known and timings are live; the model v(k) + c*k for the first round
        # (it holds the prompts' prefills) and when c is fixed. Decided before this round updates c.
        measured = self.fixed_cost_ratio is None and self.cost_ratio is not None and verify_seconds is not None
        if verify_seconds is not None and verify_seconds > 0:
            self.verify_cost.add(proposed, verify_seconds)
        unit = self.verify_cost.unit
        if self.fixed_cost_ratio is None:
            # c: a whole draft step as this schedule timed it (the forward and the processing around it, which for
            # a small draft is a large part), else the decoder's measure (see SpeculativeStats: for one prompt the
            # forward and choosing its token, in a batch the forward alone).
            if self._draft_steps and unit is not None and verify_seconds is not None:
                self.cost_ratio = self._draft_step_seconds / self._draft_steps / unit
            elif cost_ratio is not None:
                self.cost_ratio = cost_ratio
        if measured:
            seconds = time.perf_counter() - self._round_start
        else:
            c = self.cost_ratio if self.cost_ratio is not None else 0.0
            seconds = (self.verify_cost.curve(proposed)[proposed] + c * proposed) * self._unit()
        self.tokens += tokens
        self._row_seconds += seconds * rows

    def _report_threshold(self) -> None:
        """`threshold`, for people and tests: tau_1 = a^-1((c + dv_1) * R), the lower edge of the first bin whose
        acceptance beats one row's break-even. Only a report: the decisions are made draft by draft above."""
        need = self._break_even(1)
        if need is not None:
            self.threshold = next((b / self.BINS for b, a in enumerate(self.acceptance_curve()) if a >= need), 1.0)


def make_schedule(
    config: GenerationConfig, cost_ratio: float | None = None, verify_slope: float | None = None
) -> LookaheadSchedule:
    """The schedule named by `config.lookahead_schedule`. `cost_ratio` and `verify_slope` fix c and v(k) = 1 + slope*k
    for the threshold schedule (by default both are measured)."""
    if config.lookahead_schedule == "heuristic":
        return HeuristicSchedule(config)
    if config.lookahead_schedule == "threshold":
        return ThresholdSchedule(config, cost_ratio, verify_slope)
    return ConstantSchedule(config)
