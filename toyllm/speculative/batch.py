"""Speculative sampling for a batch of prompts, each row accepting its own number of drafts.

The round is the batch-of-one round (decode.py) done for B rows at once: the draft proposes k tokens for every row
(k forwards of B rows), the target verifies all B x (k + 1) positions in one forward, and then every row runs the
acceptance rule on its own and keeps its own n_b drafts plus one token. Rows therefore advance by different amounts.

Why the caches get *holes*: both KV caches hold one row per sequence and one shared length. A round writes k + 1
slots for every row, but row b keeps only its first n_b + 1 of them. Moving every row's entries to close the gaps
would copy caches every round; instead the slots a row rejected stay where they are and are masked out. Three
per-slot tables describe the layout, shared by both models:

    slot_tok[b, s]  the token written at slot s of row b       slot_pos[b, s]  its position (for the learned wpe)
    slot_ok[b, s]   whether row b's attention may see it (False for left padding and for rejected drafts)

A row's positions count only its own tokens, so holes take no position: the model sees exactly the sequence that
plain decoding would give it. Rejected slots beyond the longest row's accepted ones are cut off (`truncate`); the
rest are masked. The cache length grows by max_b(n_b + 1) over unfinished rows per round, so holes use up slots; when
the next round would not fit, `_compact` moves every row's visible slots to the front of both caches (a gather, no
model forward). Finished rows give up their slots.

The draft replays the slots it has not seen from the tables: after a round where some row accepted all k drafts, that
row's last draft sits in a slot only the target filled, and the draft's first forward of the next round feeds it
(a hole for the other rows) together with the new token.

Scope: every row must fit in the context window (prompt + max_new_tokens); one prompt at a time slides the window.
The schedules choose one k for the whole batch. `constant` and `heuristic` hear the row that accepted fewest (one
that kept every draft it could use counts as fully accepted). `threshold` hears every live row: a draft is worth
proposing when the tokens it is expected to add over all rows pay for it, the one-prompt rule summed over rows.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Any

import torch

from toyllm.errors import InvalidArgumentError
from toyllm.generation import GenerationConfig, GenerationStats, _positions, _StopChecker, _sync, prefill
from toyllm.gpt2.model import GPT2LMHeadModel
from toyllm.kv_cache import KVCache
from toyllm.sampling import greedy, logits_to_probs, process_logits, sample
from toyllm.speculative.decode import check_draft, draft_confidence, run_rounds
from toyllm.speculative.schedules import LookaheadSchedule, make_schedule
from toyllm.speculative.stats import SpeculativeStats
from toyllm.speculative.verify import verify_drafts, verify_greedy


class BatchSpeculativeDecoder:
    """The state of one batched speculative generation; `step()` runs one round.

    Exposed for tests: `tokens` (B, columns) holds the left-padded prompts then each row's new tokens; row b's
    sequence is `tokens[b, :next_column[b]]` where `token_ok` is True. `target_cache`, `draft_cache` and the slot
    tables `slot_tok`, `slot_pos`, `slot_ok` describe the caches (see the module docstring).
    """

    def __init__(
        self,
        target: GPT2LMHeadModel,
        draft: GPT2LMHeadModel,
        input_ids: torch.Tensor,
        config: GenerationConfig,
        *,
        attention_mask: torch.Tensor | None = None,
        tokenizer: Any | None = None,
        schedule: LookaheadSchedule | None = None,
        stats: SpeculativeStats | None = None,
    ) -> None:
        config.validate()
        if input_ids.ndim != 2 or input_ids.shape[1] == 0:
            raise InvalidArgumentError("input_ids must have shape (batch, prompt_length) with a non-empty prompt")
        check_draft(target, draft)
        self.config, self.target, self.draft = config, target, draft
        B, T0 = input_ids.shape
        device = input_ids.device
        prompt_ok = torch.ones(B, T0, dtype=torch.bool, device=device)
        if attention_mask is not None:
            prompt_ok = attention_mask.bool().to(device)
        lengths = prompt_ok.sum(dim=1)  # (B,) real prompt tokens per row
        if bool((lengths == 0).any()):
            raise InvalidArgumentError("every prompt in the batch needs at least one token")
        self.window = W = min(target.config.n_positions, draft.config.n_positions)
        longest = int(lengths.max()) + config.max_new_tokens
        if longest > W:
            raise InvalidArgumentError(
                f"batched speculative decoding stays inside the context window: the longest prompt plus "
                f"max_new_tokens is {longest} tokens, the window is {W}; generate past it one prompt at a time"
            )
        self.pad = config.pad_token_id if config.pad_token_id is not None else (config.eos_token_id or 0)
        self.prompt_columns = T0
        columns = T0 + config.max_new_tokens + config.max_lookahead + 1  # room for the drafts of the last round
        self.tokens = torch.full((B, columns), self.pad, dtype=torch.long, device=device)
        self.tokens[:, :T0] = input_ids
        self.token_ok = torch.zeros(B, columns, dtype=torch.bool, device=device)
        self.token_ok[:, :T0] = prompt_ok
        # Column of each row's next token. Its position (for wpe) is that minus the row's left padding.
        self.next_column = torch.full((B,), T0, dtype=torch.long, device=device)
        self.padding = T0 - lengths  # (B,)
        self.target_cache = KVCache.for_model(target, B, max_len=W)
        self.draft_cache = KVCache.for_model(draft, B, max_len=W)
        self.slot_tok = torch.zeros(B, W, dtype=torch.long, device=device)
        self.slot_pos = torch.zeros(B, W, dtype=torch.long, device=device)
        self.slot_ok = torch.zeros(B, W, dtype=torch.bool, device=device)
        self.stopper = _StopChecker(config, tokenizer, B, device)
        self.finished = torch.zeros(B, dtype=torch.bool, device=device)  # stopped, or max_new_tokens reached
        self.generator = torch.Generator(device=device).manual_seed(config.seed) if config.seed is not None else None
        self.schedule = schedule if schedule is not None else make_schedule(config)
        self.stats = stats if stats is not None else SpeculativeStats()
        self.greedy = config.temperature == 0.0
        self.done = False
        self.primed = False
        self.shown = 0  # new tokens per row already handed out by next_block()

    # -- the caches ----------------------------------------------------------------------------------------------

    def _fill_prompts(self) -> None:
        """Both caches take every prompt but its last token: the slots are the left-padded prompt columns."""
        self.primed = True
        n = self.prompt_columns - 1
        self.slot_tok[:, :n] = self.tokens[:, :n]
        self.slot_ok[:, :n] = self.token_ok[:, :n]
        self.slot_pos[:, :n] = _positions(self.token_ok[:, :n])  # padding takes no position
        if n == 0:
            return
        s = self.stats
        start = time.perf_counter()
        prefill(self.target, self.target_cache, self.slot_tok[:, :n], self.slot_ok[:, :n], self.config.chunk_size)
        _sync(self.tokens.device)
        middle = time.perf_counter()
        prefill(self.draft, self.draft_cache, self.slot_tok[:, :n], self.slot_ok[:, :n], self.config.chunk_size)
        _sync(self.tokens.device)
        end = time.perf_counter()
        s.target_forwards += 1
        s.target_seconds += middle - start
        s.draft_forwards += 1
        s.draft_prefills += 1
        s.draft_seconds += end - middle
        s.draft_prefill_seconds += end - middle
        s.prompt_forwards += 2
        s.prompt_seconds += end - start

    def _write_slot(self, slot: int, token: torch.Tensor, position: torch.Tensor) -> None:
        """Record (B,) tokens at `slot` of every row. A draft past a row's budget or window is never emitted, but it
        still goes through the models with the others: its position is clamped to stay a valid wpe index."""
        self.slot_tok[:, slot] = token
        self.slot_pos[:, slot] = position.clamp(max=self.window - 1)
        self.slot_ok[:, slot] = True

    def _compact(self) -> None:
        """Close the holes: move every live row's visible slots to the front (left-padded) in both caches and the
        tables. A key/value pair depends on its token and what that token saw, not on its slot, so moving it is exact;
        this is a gather over the cache, far cheaper than recomputing it."""
        C = self.target_cache.length
        if self.draft_cache.length < C:  # bring the draft level first, so that one slot map serves both caches
            self._timed_draft(self.draft_cache.length, C)
        ok = self.slot_ok[:, :C] & ~self.finished[:, None]  # (B, C); finished rows give up all their slots
        width = int(ok.sum(dim=1).max())
        slots = torch.arange(C, device=ok.device)
        # Hidden slots get key -1 and sort first; visible ones keep their order (a stable sort). The last `width`
        # columns are then each row's visible slots, preceded by hidden ones that act as left padding.
        order = torch.where(ok, slots, -1).sort(dim=1, stable=True).indices[:, C - width :]  # (B, width) old slots
        for table in (self.slot_tok, self.slot_pos):
            table[:, :width] = table[:, :C].gather(1, order)
        self.slot_ok[:, :width] = ok.gather(1, order)
        self.slot_ok[:, width:] = False
        for cache in (self.target_cache, self.draft_cache):
            for buffers in (cache.k, cache.v):
                for t in buffers:  # (B, heads, max_len, head_dim)
                    B, H, _, D = t.shape
                    t[:, :, :width] = t[:, :, :C].gather(2, order[:, None, :, None].expand(B, H, width, D))
            cache.truncate(width)
        self.stats.compactions += 1

    def _forward(self, model: GPT2LMHeadModel, cache: KVCache, start: int, end: int, last: int) -> torch.Tensor:
        """Feed slots [start, end) from the tables to `model`; return the logits of the `last` ones, (B, last, V)."""
        return model(
            self.slot_tok[:, start:end],
            cache=cache,
            position_ids=self.slot_pos[:, start:end],
            attention_mask=self.slot_ok[:, :end],  # (B, end): cached plus new slots, holes and padding hidden
            logits_to_keep=last,
        )

    def _timed_draft(self, start: int, end: int) -> torch.Tensor:
        """A draft forward over slots [start, end); its last position's logits, (B, V)."""
        t0 = time.perf_counter()
        logits = self._forward(self.draft, self.draft_cache, start, end, 1)[:, -1]
        _sync(logits.device)
        self.stats.draft_forwards += 1
        self.stats.draft_seconds += time.perf_counter() - t0
        return logits

    # -- sampling ------------------------------------------------------------------------------------------------

    def _process(self, logits: torch.Tensor, upto: torch.Tensor) -> torch.Tensor:
        """Plain generation's pipeline on (B * P, V) logits, P positions per row in row-major order (row b's are
        b * P .. b * P + P - 1), where logits row r comes after columns [0, upto[r]) of its sequence."""
        c = self.config
        previous = valid = None
        if c.repetition_penalty != 1.0:
            per_row = logits.shape[0] // self.tokens.shape[0]  # P
            columns = int(upto.max())
            previous = self.tokens[:, :columns].repeat_interleave(per_row, dim=0)  # (B * P, columns)
            col = torch.arange(columns, device=upto.device)[None]  # (1, columns)
            # The prompt's real tokens, then everything after it up to upto (accepted tokens and this round's drafts).
            ok = self.token_ok[:, :columns].repeat_interleave(per_row, dim=0) | (col >= self.prompt_columns)
            valid = ok & (col < upto[:, None])
        return process_logits(
            logits,
            previous,
            temperature=c.temperature,
            top_k=c.top_k,
            top_p=c.top_p,
            repetition_penalty=c.repetition_penalty,
            valid=valid,
        )

    def _draft_tokens(self, logits: torch.Tensor, processed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample one draft token per row; return them (B,) with q (B, V), exactly what they were sampled from.

        `logits` (the raw ones) is unused; a test passes through here to plant the classic bug (q from raw logits).
        """
        token = sample(processed, self.config.temperature, self.generator)
        return token, logits_to_probs(processed, self.config.temperature)

    # -- one round -----------------------------------------------------------------------------------------------

    @property
    def prompt_tokens(self) -> int:
        return self.prompt_columns

    @property
    def new_tokens(self) -> int:
        """Columns every unfinished row has produced (all of them once every row is finished)."""
        if bool(self.finished.all()):
            return int(self.next_column.max()) - self.prompt_columns
        return int(self.next_column[~self.finished].min()) - self.prompt_columns

    def next_block(self) -> torch.Tensor:
        """Run a round; return the (B, n) columns it completed: rows run ahead of each other, so a column is shown
        once every unfinished row has produced it (finished rows show `pad_token_id`)."""
        shown = self.prompt_columns + self.shown
        self.step()
        self.shown = self.new_tokens
        return self.tokens[:, shown : self.prompt_columns + self.shown].clone()

    def step(self) -> None:
        """Run one round (nothing once generation is over)."""
        if self.done:
            return
        start = time.perf_counter()
        if not self.primed:
            self._fill_prompts()
        self._round()
        _sync(self.tokens.device)
        self.stats.total_seconds += time.perf_counter() - start

    def _round(self) -> None:
        cfg = self.config
        B = self.tokens.shape[0]
        live = [not f for f in self.finished.tolist()]  # rows still generating at the start of this round
        generated = (self.next_column - self.prompt_columns).tolist()
        budget = [cfg.max_new_tokens - g for g in generated]  # tokens each row may still emit
        # One k for the batch: the schedule's, but no more than the row with the most room left can use.
        k = min(self.schedule.lookahead, max(budget[b] for b in range(B) if live[b]) - 1)
        if self.target_cache.length + k + 1 > self.window:  # holes used up the slots: close them
            self._compact()
            k = min(k, self.window - self.target_cache.length - 1)
        last_slot = self.target_cache.length  # where every row's last token goes this round
        rows = torch.arange(B, device=self.tokens.device)
        self._write_slot(last_slot, self.tokens[rows, self.next_column - 1], self.next_column - self.padding - 1)

        room = [budget[b] - 1 for b in range(B)]  # drafts each row could still emit
        drafts, q, confidences = self._propose(last_slot, k, room)  # (B, k), (B, k, V)
        k = drafts.shape[1]  # the threshold schedule may have stopped early
        verified = self.stats.verify_seconds
        scores = self._score(last_slot, drafts)  # (B, k + 1, V) processed
        # Drafts row b could emit at all (k follows the row with the most room; finished rows are skipped anyway).
        usable = [min(k, r) for r in room]
        kept = self._accept(drafts, q, scores, live, usable)  # per row: drafts the acceptance rule kept
        self._roll_back(last_slot, k, kept)

        fewest = self._fewest_accepted(k, kept, usable, live)
        s = self.stats
        s.rounds += 1
        s.lookaheads.append(k)
        s.accepted_per_round.append(fewest)
        c = s.cost_ratio
        live_rows = [b for b in range(B) if live[b]]
        self.schedule.update_rows(
            k,
            fewest,
            [min(kept[b], usable[b]) for b in live_rows],  # drafts each row keeps (the rule judged all k)
            [[confidences[j][b] for j in range(usable[b])] for b in live_rows],  # the drafts each row could use
            c if math.isfinite(c) else None,
            s.verify_seconds - verified,
        )
        self.done = bool(self.finished.all())

    @staticmethod
    def _fewest_accepted(k: int, kept: list[int], usable: list[int], live: list[bool]) -> int:
        """What the schedule hears: the fewest drafts any row accepted this round.

        A row that kept every draft it could use (a row near its end has fewer than k) counts as k, fully accepted:
        that is the `heuristic` schedule's signal to grow, and a batch of one then reports exactly what the
        one-prompt decoder reports.
        """
        fewest = k
        for b, is_live in enumerate(live):
            if is_live and kept[b] < usable[b]:
                fewest = min(fewest, kept[b])
        return fewest

    def _propose(self, last_slot: int, k: int, room: list[int]) -> tuple[torch.Tensor, torch.Tensor, list[list[float]]]:
        """The draft writes up to k tokens per row after each row's last token; return them (B, k), the distributions
        they were sampled from (B, k, V; (B, 0, V) at temperature 0) and the draft's confidences [draft][row].
        `room[b]` is how many drafts row b could still emit: beyond it the schedule hears NaN (nothing to gain)."""
        B, device = self.tokens.shape[0], self.tokens.device
        rows = torch.arange(B, device=device)
        live = ~self.finished  # (B,) bool
        live_rows = live.nonzero().flatten().tolist()
        self.schedule.start_round()
        drafts: list[torch.Tensor] = []
        qs: list[torch.Tensor] = []
        confidences: list[list[float]] = []  # per draft, per row
        for i in range(1, k + 1):
            # The draft's first forward also replays the slots it has not seen (a row's last draft of the previous
            # round, when that row accepted them all). Draft i follows column next_column + i - 2.
            logits = self._timed_draft(self.draft_cache.length, last_slot + i)  # (B, V)
            processed = self._process(logits, self.next_column + i - 1)
            # Every row's confidence; the schedule decides for the batch from the live rows' (keep_drafting_rows).
            confidence = (
                draft_confidence(self.draft, processed).tolist()  # (B,)
                if self.schedule.uses_confidence
                else [math.nan] * B
            )
            heard = [confidence[b] if i <= room[b] else math.nan for b in live_rows]
            if not self.schedule.keep_drafting_rows(i, heard) and i > 1:
                break
            if self.greedy:
                token = greedy(processed)
            else:
                token, q_row = self._draft_tokens(logits, processed)
                qs.append(q_row)
            self.tokens[rows[live], (self.next_column + i - 1)[live]] = token[live]  # tentatively, after each row
            self._write_slot(last_slot + i, token, self.next_column - self.padding - 1 + i)
            drafts.append(token)
            confidences.append(confidence)
        V = self.target.config.vocab_size
        stacked = torch.stack(drafts, dim=1) if drafts else rows.new_zeros(B, 0)
        q = torch.stack(qs, dim=1) if qs else torch.zeros(B, 0, V, device=device)
        return stacked, q, confidences

    def _score(self, last_slot: int, drafts: torch.Tensor) -> torch.Tensor:
        """The target's ONE forward over [last, d_1 .. d_k] for every row; its logits processed position by position."""
        B, k = drafts.shape
        t0 = time.perf_counter()
        logits = self._forward(self.target, self.target_cache, last_slot, last_slot + k + 1, k + 1)  # (B, k + 1, V)
        _sync(logits.device)
        elapsed = time.perf_counter() - t0
        s = self.stats
        s.target_forwards += 1
        s.target_seconds += elapsed
        s.verify_seconds += elapsed
        # Position j of row b comes after the row's tokens up to its last one and drafts d_1 .. d_j.
        upto = (self.next_column[:, None] + torch.arange(k + 1, device=drafts.device)[None]).flatten()  # (B*(k+1),)
        return self._process(logits.flatten(0, 1), upto).view(B, k + 1, -1)

    def _accept(
        self, drafts: torch.Tensor, q: torch.Tensor, scores: torch.Tensor, live: list[bool], usable: list[int]
    ) -> list[int]:
        """Every live row runs the acceptance rule on its own drafts and emits what it keeps plus one token."""
        s = self.stats
        p = None if self.greedy else logits_to_probs(scores, self.config.temperature)  # (B, k + 1, V)
        # Every row's drafts (and at temperature 0 the target's argmaxes) read to the host at once: on a GPU each
        # read is a sync.
        target_tokens = greedy(scores).tolist() if self.greedy else None  # (B, k + 1)
        draft_ids: list[list[int]] = drafts.tolist()  # (B, k)
        kept = [0] * len(live)
        for b, is_live in enumerate(live):
            if not is_live:
                continue
            if target_tokens is not None:
                n, nxt = verify_greedy(draft_ids[b], target_tokens[b])
            else:
                assert p is not None
                n, nxt = self._verify(drafts[b], q[b], p[b], self.generator)
            kept[b] = n
            self.tokens[b, int(self.next_column[b]) + n] = nxt  # the residual or bonus token after the kept drafts
            # Counted as the one-prompt decoder counts: only the drafts this row could have emitted; and when a stop
            # cuts the row short, only the accepted drafts it emitted, and a rejection only if it was reached.
            emitted = self._emit(b, [*draft_ids[b][:n], nxt])
            s.proposed += usable[b]
            s.accepted += min(n, usable[b], emitted)
            s.rejected += int(n < usable[b] and emitted > n)
        return kept

    def _roll_back(self, last_slot: int, k: int, kept: list[int]) -> None:
        """Row b keeps its last token and kept drafts (slots last_slot .. last_slot + n_b); the caches keep what the
        furthest unfinished row needs. Finished rows (before or during this round) keep nothing."""
        device = self.slot_ok.device
        n = torch.tensor(kept, device=device)
        self.slot_ok[:, last_slot : last_slot + k + 1] &= torch.arange(k + 1, device=device)[None] <= n[:, None]
        self.slot_ok[self.finished, last_slot:] = False
        going_on = [kept[b] for b in range(len(kept)) if not self.finished[b]]
        new_length = last_slot + 1 + max(going_on) if going_on else last_slot
        self.slot_ok[:, new_length:] = False
        self.target_cache.truncate(new_length)
        self.draft_cache.truncate(min(self.draft_cache.length, new_length))

    def _emit(self, b: int, new_ids: list[int]) -> int:
        """Advance row b over its round's new tokens (host ints), one at a time, stopping after EOS, a stop string or
        max_new_tokens; return how many it emitted."""
        column = start = int(self.next_column[b])
        row = self.tokens[b]  # (columns,)
        for token in new_ids:
            column += 1
            self.stats.new_tokens += 1
            if (
                self.stopper.stops_at(token, row, self.prompt_columns, column)
                or column - self.prompt_columns >= self.config.max_new_tokens
            ):
                self.finished[b] = True
                self.tokens[b, column:] = self.pad  # a finished row shows padding, as in plain batched decoding
                break
        self.token_ok[b, start:column] = True
        self.next_column[b] = column
        return column - start

    _verify = staticmethod(verify_drafts)  # a class attribute, so that a test can swap in a broken rule


def batch_speculative_stream(
    target: GPT2LMHeadModel,
    draft: GPT2LMHeadModel,
    input_ids: torch.Tensor,
    config: GenerationConfig,
    *,
    attention_mask: torch.Tensor | None = None,
    tokenizer: Any | None = None,
    stats: GenerationStats | None = None,
    spec_stats: SpeculativeStats | None = None,
    schedule: LookaheadSchedule | None = None,
) -> Iterator[torch.Tensor]:
    """Yield (B, n) blocks of new tokens, as plain batched decoding would: a row that finished shows `pad_token_id`.

    Rows run ahead of each other; a column is yielded once every unfinished row has produced it.
    """
    spec = spec_stats if spec_stats is not None else SpeculativeStats()
    decoder = BatchSpeculativeDecoder(
        target,
        draft,
        input_ids,
        config,
        attention_mask=attention_mask,
        tokenizer=tokenizer,
        schedule=schedule,
        stats=spec,
    )
    return run_rounds(decoder, stats if stats is not None else GenerationStats())
