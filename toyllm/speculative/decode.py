"""Speculative sampling: a cheap draft model proposes tokens, the target verifies them all in one forward pass.

One *round* (batch size 1; `L` tokens so far, the target's cache holding all but the last):

    1. the draft proposes k tokens one by one with its own KV cache, sampling each from q, its processed
       distribution (the same repetition penalty / temperature / top-k / top-p as plain sampling);
    2. the target runs ONE forward over [last token, d_1 .. d_k] (k + 1 positions, a bottom-right causal mask
       over its cache) and processes its logits the same way, position by position, into p;
    3. `verify_drafts` (`verify_greedy` at temperature 0, where p and q are one-hots) keeps the first n drafts
       and picks one more token (residual or bonus), so every round emits n + 1 tokens, each distributed exactly
       as the target alone would sample it;
    4. both caches roll back to the accepted tokens (`truncate`: rejected rows are overwritten later).

Nothing accepted is recomputed: the target's cache already holds d_1 .. d_n, and the draft's cache holds what it
fed. The draft's cache lags one or two tokens behind (the token it proposed last, the bonus token); it catches up
by feeding them together at the start of the next round.

Context window: each model predicts from at most its `n_positions` latest tokens, with the same rule as plain
generation (`toyllm.generation`): when the target's context would overflow, its window start jumps to
`L - window_keep` and its cache is rebuilt by one prefill. A round never drafts past the window, so the target
sees exactly the contexts that plain decoding gives it, and the output equals plain decoding even past the window.
The draft slides its own window independently (it only affects speed). With `sliding_window=False`, generation
stops at the target's window, as plain decoding does.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Any

import torch

from toyllm.errors import InvalidArgumentError
from toyllm.generation import GenerationConfig, GenerationStats, _StopChecker, _sync, prefill
from toyllm.gpt2.model import GPT2LMHeadModel
from toyllm.kv_cache import KVCache
from toyllm.sampling import greedy, logits_to_probs, process_logits, sample_probs
from toyllm.speculative.schedules import LookaheadSchedule, make_schedule
from toyllm.speculative.stats import SpeculativeStats
from toyllm.speculative.verify import verify_drafts, verify_greedy


def check_draft(target: GPT2LMHeadModel, draft: GPT2LMHeadModel) -> None:
    """A draft must speak the target's vocabulary and live on its device."""
    if draft.config.vocab_size != target.config.vocab_size:
        raise InvalidArgumentError(
            f"the draft model has a vocabulary of {draft.config.vocab_size} tokens but the target has "
            f"{target.config.vocab_size}; speculative decoding needs both to share one tokenizer"
        )
    if draft.config.n_positions < 2:  # its window could not hold the two tokens a round may feed it
        raise InvalidArgumentError(
            f"the draft's context window is {draft.config.n_positions} token; a draft needs at least 2"
        )
    t_dev, d_dev = next(target.parameters()).device, next(draft.parameters()).device
    if t_dev != d_dev:
        raise InvalidArgumentError(f"the draft is on {d_dev} but the target is on {t_dev}; put both on one device")


def draft_confidence(draft: GPT2LMHeadModel, processed: torch.Tensor) -> torch.Tensor:
    """The draft's top probability per row of its processed (rows, V) logits, what the `threshold` schedule reads.

    A vocabulary-restricted draft (`restrict_vocab`) gives every token outside its kept ids a logit of -inf, which
    no processing step raises, so they add nothing to the softmax: only the kept columns are read (at 50257 tokens
    the full softmax cost about a tenth of a small draft's step).
    """
    if draft.head_vocab is not None:
        processed = processed.index_select(-1, draft.head_vocab)  # (rows, kept)
    return torch.softmax(processed, dim=-1).amax(dim=-1)


class _Window:
    """One model, its KV cache, and the start `s` of the tokens it sees: the cache holds tokens[s : s + length]."""

    def __init__(self, model: GPT2LMHeadModel, max_len: int, keep: int) -> None:
        self.model = model
        self.size = model.config.n_positions
        self.keep = keep  # tokens kept when the window slides
        self.cache = KVCache.for_model(model, 1, max_len=min(self.size, max_len))
        self.start = 0
        self.primed = False  # whether the prompt went in (for SpeculativeStats.prompt_seconds)

    @property
    def end(self) -> int:
        """Absolute index one past the last token in the cache."""
        return self.start + self.cache.length

    def slide(self, length: int) -> None:
        """Keep the last `keep` of `length` tokens: the cache empties and refills from tokens[start:] later."""
        self.start = length - self.keep
        self.cache.reset()

    def rollback(self, length: int) -> None:
        """Forget cached tokens at absolute positions >= length (rejected drafts)."""
        self.cache.truncate(max(0, min(self.end, length) - self.start))


class SpeculativeDecoder:
    """The state of one speculative generation; `step()` runs one round and returns the tokens it emitted.

    Exposed for tests and the curious: `tokens[:length]` is the sequence so far (prompt first), `target_window.cache`
    and `draft_window.cache` the two KV caches, `stats` the counters, `schedule` the lookahead schedule.
    """

    def __init__(
        self,
        target: GPT2LMHeadModel,
        draft: GPT2LMHeadModel,
        input_ids: torch.Tensor,
        config: GenerationConfig,
        *,
        tokenizer: Any | None = None,
        schedule: LookaheadSchedule | None = None,
        stats: SpeculativeStats | None = None,
    ) -> None:
        config.validate()
        if input_ids.ndim != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] == 0:
            raise InvalidArgumentError(
                "speculative decoding takes one non-empty prompt (batch size 1), input_ids of shape (1, T); "
                f"got {tuple(input_ids.shape)}"
            )
        check_draft(target, draft)
        self.config = config
        self.target, self.draft = target, draft
        device = input_ids.device
        W = target.config.n_positions
        keep = config.window_keep if config.window_keep is not None else W // 2
        if keep >= W:
            raise InvalidArgumentError(f"window_keep ({keep}) must be smaller than the context window ({W})")
        self.prompt_length = T0 = input_ids.shape[1]
        if T0 > W and not config.sliding_window:
            raise InvalidArgumentError(
                f"the prompt has {T0} tokens but the model's context window is {W}; shorten it or allow the window"
            )
        total = T0 + config.max_new_tokens
        # Drafts are written here too, tentatively, right after the accepted tokens: rejected ones get overwritten.
        self.tokens = torch.zeros(total, dtype=torch.long, device=device)
        self.tokens[:T0] = input_ids[0]
        self.length = T0
        self.target_window = _Window(target, total, keep)  # a prompt longer than W slides it in the first round
        W_d = draft.config.n_positions
        self.draft_window = _Window(draft, total, keep if keep < W_d else W_d // 2)
        self.stopper = _StopChecker(config, tokenizer, 1, device)
        self.generator = torch.Generator(device=device).manual_seed(config.seed) if config.seed is not None else None
        self.schedule = schedule if schedule is not None else make_schedule(config)
        self.stats = stats if stats is not None else SpeculativeStats()
        self.done = False
        self.greedy = config.temperature == 0.0

    # -- one round ---------------------------------------------------------------------------------------------

    @property
    def prompt_tokens(self) -> int:
        return self.prompt_length

    @property
    def new_tokens(self) -> int:
        """Tokens generated so far."""
        return self.length - self.prompt_length

    def next_block(self) -> torch.Tensor:
        """`step()` as a (1, n) block, the shape `run_rounds` yields."""
        return self.step()[None]

    def step(self) -> torch.Tensor:
        """Run one round; return the (n,) tokens it emitted (empty once generation is over)."""
        if self.done:
            return self.tokens[:0]
        start = time.perf_counter()
        new = self._round()
        _sync(self.tokens.device)
        self.stats.total_seconds += time.perf_counter() - start
        return new

    def _round(self) -> torch.Tensor:
        cfg, L = self.config, self.length
        tw, dw = self.target_window, self.draft_window
        if L - tw.start > tw.size:  # the target's context is full: slide, exactly as plain generation does
            if not cfg.sliding_window:
                self.done = True
                return self.tokens[:0]
            tw.slide(L)
        # How many drafts: the schedule's K, but never past max_new_tokens (k drafts + 1 token <= what is left)
        # nor past the target's window (the last draft sits at position L + k - 1, predicting position L + k).
        remaining = self.prompt_length + cfg.max_new_tokens - L
        k = min(self.schedule.lookahead, remaining - 1, tw.start + tw.size - L)
        if k > 0:  # the draft reads tokens[dw.start : L + k - 1]: slide its window if even L is too far
            if L - dw.start > dw.size:
                dw.slide(L)
            k = min(k, dw.start + dw.size - L + 1)

        confidences, q, drafts = self._propose(k)
        k = len(drafts)
        verified = self.stats.verify_seconds
        scores, verify_start = self._target_scores(k)  # (k + 1, V) processed logits
        if self.greedy:  # p and q are one-hots: compare argmaxes (verify_greedy), no distributions needed
            best = greedy(scores).tolist()
            self._count_verify(verify_start, synced=True)
            n, nxt = verify_greedy(drafts, best)
        else:
            self._count_verify(verify_start, synced=False)
            p = logits_to_probs(scores, cfg.temperature)  # (k + 1, V)
            n, nxt = self._verify(self.tokens[L : L + k], q, p, self.generator)
        self.tokens[L + n] = nxt  # overwrite the first rejected draft (or write the bonus token)
        tw.rollback(L + n)  # the cache keeps the last token out, so it stays one behind: tokens[start : L + n]
        dw.rollback(L + n)

        emitted = self._emit([*drafts[:n], nxt])
        s = self.stats
        s.rounds += 1
        s.proposed += k
        # A stop (EOS, a stop string) can cut the round short: count only the accepted drafts that were emitted, and
        # the rejection only if it was reached. The schedule still hears the verification's outcome, n of k.
        s.accepted += min(n, emitted)
        s.rejected += int(n < k and emitted > n)
        s.new_tokens += emitted
        s.lookaheads.append(k)
        s.accepted_per_round.append(n)
        c = s.cost_ratio
        self.schedule.update(k, n, confidences, c if math.isfinite(c) else None, s.verify_seconds - verified)
        return self.tokens[L : L + emitted]

    def _emit(self, new_ids: list[int]) -> int:
        """Advance over the round's new tokens one at a time, stopping right after EOS, a stop string or
        max_new_tokens; return how many were emitted.

        The tokens come as host ints (the round had to read them anyway): testing them on the device cost a few
        kernel launches and a sync per token, a visible share of a round when a small model runs on a GPU.
        """
        for i, token in enumerate(new_ids):
            self.length += 1
            if (
                self.stopper.stops_at(token, self.tokens, self.prompt_length, self.length)
                or self.length - self.prompt_length >= self.config.max_new_tokens
            ):
                self.done = True
                return i + 1
        return len(new_ids)

    # -- the draft ---------------------------------------------------------------------------------------------

    def _process(
        self, logits: torch.Tensor, previous: torch.Tensor | None, valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The plain-generation sampling pipeline: (rows, V) logits after the tokens `previous` (rows, T), which the
        callers pass only when a repetition penalty reads them (None otherwise: no slice taken per token)."""
        c = self.config
        return process_logits(
            logits,
            previous,
            temperature=c.temperature,
            top_k=c.top_k,
            top_p=c.top_p,
            repetition_penalty=c.repetition_penalty,
            valid=valid,
        )

    def _propose(self, k: int) -> tuple[list[float], torch.Tensor, list[int]]:
        """Let the draft write up to k tokens at tokens[L : L + k]; return their confidences, q, (k, V), and the
        tokens themselves as host ints.

        At temperature 0 q is (0, V): greedy verification compares tokens and needs no distributions.
        """
        L, dw = self.length, self.draft_window
        self.schedule.start_round()
        confidences: list[float] = []
        drafts: list[int] = []
        qs: list[torch.Tensor] = []
        for i in range(1, k + 1):
            pos = L + i - 1  # index of the token to propose
            ids = self.tokens[None, dw.end : pos]  # the 1 or 2 tokens its cache lacks (the context after a slide)
            start = time.perf_counter()
            logits = prefill(self.draft, dw.cache, ids, chunk_size=self.config.chunk_size)  # (1, V)
            previous = self.tokens[None, :pos] if self.config.repetition_penalty != 1.0 else None  # what it penalises
            processed = self._process(logits, previous)
            # The draft's confidence: its top probability (before the greedy one-hot, so it means something at T=0).
            confidence = float(draft_confidence(self.draft, processed)) if self.schedule.uses_confidence else math.nan
            if not self.schedule.keep_drafting(i, confidence) and i > 1:
                self._count_draft(ids.shape[1], start, synced=self.schedule.uses_confidence)
                break
            if self.greedy:
                token = int(greedy(processed))  # q would be the one-hot on it; verify_greedy needs only the token
            else:
                token, q = self._draft_token(logits, processed)
                qs.append(q)
            # Reading the token waited for the GPU (q, on the sampling path, was queued before it): the step is timed up
            # to here with no synchronize of its own (one per draft token cost a visible share of a round on an H100).
            self._count_draft(ids.shape[1], start, synced=True)
            self.tokens[pos] = token
            drafts.append(token)
            confidences.append(confidence)
        V = self.target.config.vocab_size
        q = torch.stack(qs) if qs else self.tokens.new_zeros(0, V, dtype=torch.float32)
        return confidences, q, drafts

    def _draft_token(self, logits: torch.Tensor, processed: torch.Tensor) -> tuple[int, torch.Tensor]:
        """Sample a draft token and return it with q, EXACTLY the distribution it was sampled from, (V,).

        `logits` (the raw ones) is unused here; it is passed so that a test can plant the classic bug (q from raw
        logits) and watch the output distribution go wrong.
        """
        q = logits_to_probs(processed, self.config.temperature)  # (1, V): the token is drawn from q itself
        return int(sample_probs(q, self.generator)), q[0]

    def _since(self, start: float, *, synced: bool) -> float:
        """Seconds since `start`, once the device is done: `synced` says a read of a result already waited for it."""
        if not synced:
            _sync(self.tokens.device)
        return time.perf_counter() - start

    def _count_draft(self, fed: int, start: float, *, synced: bool) -> None:
        """Book one draft step (a forward over `fed` tokens, and choosing its token) begun at `start`."""
        elapsed = self._since(start, synced=synced)
        s = self.stats
        s.draft_forwards += 1
        s.draft_seconds += elapsed
        if fed > 2:
            s.draft_prefills += 1
            s.draft_prefill_seconds += elapsed
        if not self.draft_window.primed:  # its first forward feeds the prompt (later fills are slides: decoding)
            self.draft_window.primed = True
            s.prompt_forwards += 1
            s.prompt_seconds += elapsed

    # -- the target --------------------------------------------------------------------------------------------

    def _target_scores(self, k: int) -> tuple[torch.Tensor, float]:
        """Launch one verification forward over tokens[L - 1 : L + k]; return its logits (k + 1, V), processed row by
        row, and when the forward began, for `_count_verify` once the round has read what it needs."""
        L, tw, s = self.length, self.target_window, self.stats
        device = self.tokens.device
        start = time.perf_counter()
        prefilled = tw.end < L - 1
        if prefilled:  # the prompt (or the context after a slide), without its last token
            prefill(self.target, tw.cache, self.tokens[None, tw.end : L - 1], chunk_size=self.config.chunk_size)
            elapsed = self._since(start, synced=False)
            s.target_forwards += 1
            s.target_seconds += elapsed
            if not tw.primed:  # the prompt's prefill (a slide's re-prefill later is part of decoding)
                s.prompt_forwards += 1
                s.prompt_seconds += elapsed
        tw.primed = True
        verify_start = time.perf_counter()
        logits = self.target(self.tokens[None, L - 1 : L + k], cache=tw.cache, logits_to_keep=k + 1)[0]  # (k+1, V)
        previous = valid = None
        if self.config.repetition_penalty != 1.0:
            # Row j predicts position L + j, after tokens[:L + j]: the penalty must see exactly that prefix.
            previous = self.tokens[None, : L + k].expand(k + 1, -1)  # (k+1, L+k)
            valid = torch.arange(L + k, device=device)[None] < (L + torch.arange(k + 1, device=device))[:, None]
        return self._process(logits, previous, valid), verify_start

    def _count_verify(self, start: float, *, synced: bool) -> None:
        """Book the verification forward begun at `start`, with processing its logits and reading the outcome.

        In a greedy round the argmaxes' read is the round's one wait for the target, so it ends the timing (as the
        argmax's read ends a plain decoding step) instead of a synchronize of its own.
        """
        elapsed = self._since(start, synced=synced)
        s = self.stats
        s.target_forwards += 1
        s.target_seconds += elapsed
        s.verify_seconds += elapsed

    # The acceptance rule at temperature > 0, a plain function (see verify.py); a class attribute so that a test can
    # swap in a broken one. (Temperature 0 takes verify_greedy, which needs no distributions.)
    _verify = staticmethod(verify_drafts)


def speculative_stream(
    target: GPT2LMHeadModel,
    draft: GPT2LMHeadModel,
    input_ids: torch.Tensor,
    config: GenerationConfig,
    *,
    tokenizer: Any | None = None,
    stats: GenerationStats | None = None,
    spec_stats: SpeculativeStats | None = None,
    schedule: LookaheadSchedule | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the new tokens of one prompt, a (1, n) block per round, with the target's exact output distribution.

    `stats` gets the usual generation numbers, with the speculative ones (`SpeculativeStats.summary()`) in
    `stats.extra`; pass `spec_stats` to keep the full `SpeculativeStats` (per-round lookaheads included).
    """
    spec = spec_stats if spec_stats is not None else SpeculativeStats()
    decoder = SpeculativeDecoder(target, draft, input_ids, config, tokenizer=tokenizer, schedule=schedule, stats=spec)
    return run_rounds(decoder, stats if stats is not None else GenerationStats())


def run_rounds(decoder: Any, stats: GenerationStats) -> Iterator[torch.Tensor]:
    """Drive a speculative decoder (one prompt, or `BatchSpeculativeDecoder`) to the end, yielding its new (B, n)
    blocks and keeping `stats` filled as plain generation does: the first round's time counts as prefill.

    The decoder gives `done`, `next_block()` (run a round, return the (B, n) tokens it makes visible), `new_tokens`
    (per row so far), `prompt_tokens` and `stats` (its `SpeculativeStats`).
    """
    spec: SpeculativeStats = decoder.stats
    stats.prompt_tokens = decoder.prompt_tokens
    start = time.perf_counter()
    first = True
    with torch.inference_mode():
        while not decoder.done:
            new = decoder.next_block()
            now = time.perf_counter()
            if first:  # the first round's time counts as prefill, and so do the tokens it made
                stats.prefill_seconds, start, first = now - start, now, False
                stats.first_tokens = decoder.new_tokens
            stats.new_tokens = decoder.new_tokens
            stats.target_forwards = spec.target_forwards
            stats.decode_seconds = now - start
            stats.extra.update(spec.summary())
            if new.numel():
                yield new
