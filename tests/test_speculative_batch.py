"""Batched speculative sampling: every row accepts its own drafts, and the output is plain batched decoding's.

References: plain batched `generate` (greedy equality, stops, streaming), the target's exact joint distribution of
the next 3 tokens per prompt (chi-square, same statistic, false-alarm rate and sample count as test_speculative.py,
with deliberately broken variants that must fail), and a fresh one-row prefill of each row's tokens (cache layout).
"""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch
from kernel_helpers import KernelCalls, needs_kernel
from test_speculative import (
    ALPHA,
    FILTERED,
    FILTERED_T1,
    N_BROKEN,
    N_SAMPLES,
    PLAIN,
    LetterTokenizer,
    NoResidualDecoder,
    V,
    chi_square_p_value,
    dist_config,
    exact_continuations,
    fixed_threshold,
    fresh_cache,
    tiny,
)

from toyllm import kernels
from toyllm.errors import InvalidArgumentError
from toyllm.generation import GenerationConfig, GenerationStats, generate, generate_text
from toyllm.gpt2 import GPT2LMHeadModel
from toyllm.speculative import (
    BatchSpeculativeDecoder,
    SpeculativeDecoder,
    SpeculativeStats,
    ThresholdSchedule,
    batch_speculative_stream,
)
from toyllm.speculative.verify import verify_drafts


def left_padded(lengths: tuple[int, ...], vocab: int = 96, seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts of these lengths, left-padded (pad id 0) into (ids, attention_mask)."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, T - n :] = torch.randint(0, vocab, (n,), generator=g)
        mask[row, T - n :] = 1
    return ids, mask


@pytest.fixture(scope="module")
def target() -> GPT2LMHeadModel:
    return tiny(0)


@pytest.fixture(scope="module")
def drafts(target: GPT2LMHeadModel) -> dict[str, GPT2LMHeadModel]:
    return {
        "same": target,
        "unrelated": tiny(7, n_layer=1, tie_word_embeddings=False),
        "self": target.first_layers(1),
    }


def spec_run(target, draft, ids, mask, config, **kw) -> tuple[torch.Tensor, SpeculativeStats]:
    spec = SpeculativeStats()
    blocks = list(batch_speculative_stream(target, draft, ids, config, attention_mask=mask, spec_stats=spec, **kw))
    return torch.cat([ids, *blocks], dim=1), spec


# -- greedy: every row is what plain batched greedy decoding gives --------------------------------------------------


@pytest.mark.parametrize("K", [1, 2, 4, 8])
@pytest.mark.parametrize("kind", ["same", "unrelated", "self"])
def test_batch_greedy_equals_plain_batched_greedy(target, drafts, kind: str, K: int) -> None:
    ids, mask = left_padded((1, 5, 9, 3, 20))
    config = GenerationConfig(max_new_tokens=24, temperature=0.0, eos_token_id=None, lookahead=K, max_lookahead=8)
    expected = generate(target, ids, config, attention_mask=mask)
    out, spec = spec_run(target, drafts[kind], ids, mask, config)
    assert torch.equal(out, expected)
    assert spec.new_tokens == 5 * 24
    if kind == "same":
        assert spec.acceptance_rate == 1.0
    if kind == "unrelated":
        assert spec.acceptance_rate < 0.1
    if kind == "self":  # rows accept different numbers of drafts: the holes in the caches are exercised
        assert 0 < spec.acceptance_rate < 1


@pytest.mark.parametrize("schedule", ["heuristic", "threshold"])
def test_batch_greedy_with_adaptive_schedules(target, drafts, schedule: str) -> None:
    ids, mask = left_padded((3, 12, 7))
    config = GenerationConfig(
        max_new_tokens=30, temperature=0.0, eos_token_id=None, lookahead=2, lookahead_schedule=schedule
    )
    expected = generate(target, ids, config, attention_mask=mask)
    for kind in ("same", "self"):
        assert torch.equal(spec_run(target, drafts[kind], ids, mask, config)[0], expected)


def run_to_end(dec: BatchSpeculativeDecoder) -> BatchSpeculativeDecoder:
    with torch.inference_mode():
        while not dec.done:
            dec.step()
    return dec


def test_batch_greedy_compacts_a_small_window_with_penalty() -> None:
    """A 24-token window fills with holes after a few rounds, so the caches are compacted mid-generation, and a
    repetition penalty sees each row's own drafts."""
    target = tiny(3, n_positions=24)
    ids, mask = left_padded((1, 4, 7, 2))
    config = GenerationConfig(
        max_new_tokens=16, temperature=0.0, eos_token_id=None, lookahead=4, repetition_penalty=1.3
    )
    expected = generate(target, ids, config, attention_mask=mask)
    dec = run_to_end(BatchSpeculativeDecoder(target, target.first_layers(2), ids, config, attention_mask=mask))
    assert torch.equal(dec.tokens[:, : expected.shape[1]], expected)
    assert dec.stats.compactions > 0


def test_batch_greedy_random_cases_with_stops_that_fire() -> None:
    """Randomized but seeded: batches of 2 to 4 prompts of random lengths in small windows (16 to 32 tokens, so long
    rows run ahead of short ones and holes force compactions, also after some rows finished), random K, schedule and
    penalty. EOS and stop strings are taken from the plain output, so they really end some rows mid-generation.
    Every case must equal plain batched decoding; the tallies check that the stops and compactions did happen."""
    rng = random.Random(0)
    tok = LetterTokenizer(96)
    targets = {n: tiny(0, n_positions=n) for n in (16, 24, 32)}
    tally = {"rows stopped early": 0, "rows ran to the end": 0, "compactions with finished rows": 0}
    for case in range(40):
        window = rng.choice(list(targets))
        target = targets[window]
        draft = target.first_layers(rng.choice([1, 2]))
        B, max_new = rng.randint(2, 4), rng.randint(4, 12)
        ids, mask = left_padded(tuple(rng.randint(1, window - max_new) for _ in range(B)), seed=case)
        free = generate(
            target,
            ids,
            GenerationConfig(max_new_tokens=max_new, temperature=0.0, eos_token_id=None),
            attention_mask=mask,
        )[:, ids.shape[1] :]
        row, col = rng.randrange(B), rng.randrange(1, max_new)
        stop: dict = (
            {"eos_token_id": int(free[row, col])}
            if case % 2
            else {"eos_token_id": None, "stop": [tok.decode(free[row, col - 1 : col + 1].tolist())]}
        )
        config = GenerationConfig(
            max_new_tokens=max_new,
            temperature=0.0,
            lookahead=rng.randint(1, 6),
            max_lookahead=8,
            lookahead_schedule=rng.choice(["constant", "heuristic", "threshold"]),
            repetition_penalty=rng.choice([1.0, 1.3]),
            **stop,
        )
        expected = generate(target, ids, config, attention_mask=mask, tokenizer=tok)
        out = generate(target, ids, config, attention_mask=mask, tokenizer=tok, draft_model=draft)
        assert torch.equal(out, expected), f"case {case}"
        # The same run step by step, to see what happened in it.
        dec = BatchSpeculativeDecoder(target, draft, ids, config, attention_mask=mask, tokenizer=tok)
        with torch.inference_mode():
            while not dec.done:
                before, some_finished = dec.stats.compactions, bool(dec.finished.any())
                dec.step()
                tally["compactions with finished rows"] += some_finished and dec.stats.compactions > before
        generated = (dec.next_column - dec.prompt_columns).tolist()
        tally["rows stopped early"] += sum(g < max_new for g in generated)
        tally["rows ran to the end"] += sum(g == max_new for g in generated)
    assert all(n > 5 for n in tally.values()), tally


@pytest.mark.parametrize("schedule", ["constant", "heuristic", "threshold"])
def test_batch_of_one_drafts_like_the_one_prompt_decoder(target, drafts, schedule: str) -> None:
    """One row through the batched decoder makes the same rounds as the one-prompt decoder: the same drafts per
    round, the same acceptances, the same tokens (the threshold schedule with c fixed, so it does not depend on
    timings)."""
    config = GenerationConfig(
        max_new_tokens=30, temperature=0.0, eos_token_id=None, lookahead=2, lookahead_schedule=schedule
    )

    def schedule_for(config: GenerationConfig):
        return fixed_threshold(config) if schedule == "threshold" else None

    for ids in (torch.tensor([[5, 17, 3]]), torch.tensor([[40]])):
        one = SpeculativeDecoder(target, drafts["self"], ids, config, schedule=schedule_for(config))
        with torch.inference_mode():
            while not one.done:
                one.step()
        batch = run_to_end(BatchSpeculativeDecoder(target, drafts["self"], ids, config, schedule=schedule_for(config)))
        assert batch.stats.lookaheads == one.stats.lookaheads
        assert batch.stats.accepted_per_round == one.stats.accepted_per_round
        assert (batch.stats.proposed, batch.stats.accepted) == (one.stats.proposed, one.stats.accepted)
        assert torch.equal(batch.tokens[0, : one.length], one.tokens[: one.length])


def test_threshold_schedule_hears_every_row(target, drafts) -> None:
    """The batch tells the threshold schedule each live row's acceptances and the confidences of the drafts that row
    could use (a row near its end fewer), and the verification's time, from which it learns v(k)."""
    heard: list[tuple[int, list[int], list[list[float]], float | None]] = []
    asked: list[list[float]] = []

    class Listening(ThresholdSchedule):
        def keep_drafting_rows(self, index, confidences) -> bool:
            asked.append(list(confidences))
            return super().keep_drafting_rows(index, confidences)

        def update_rows(self, proposed, fewest, accepted, confidences, cost_ratio, verify_seconds=None) -> None:
            heard.append((proposed, list(accepted), [list(row) for row in confidences], verify_seconds))
            super().update_rows(proposed, fewest, accepted, confidences, cost_ratio, verify_seconds)

    ids, mask = left_padded((4, 7, 5))
    config = GenerationConfig(
        max_new_tokens=14, temperature=0.0, eos_token_id=None, lookahead_schedule="threshold", max_lookahead=5
    )
    schedule = Listening(config, cost_ratio=0.05, verify_slope=0.0)
    decoder = BatchSpeculativeDecoder(target, drafts["self"], ids, config, attention_mask=mask, schedule=schedule)
    dec = run_to_end(decoder)
    plain = generate(target, ids, config, attention_mask=mask)
    assert torch.equal(dec.tokens[:, : plain.shape[1]], plain)
    assert len(heard) == dec.stats.rounds and any(len(set(map(len, rows))) > 1 for _, _, rows, _ in heard)
    assert len(heard[0][1]) == 3 and len(heard[-1][1]) < 3  # rows run ahead of each other: finished ones are silent
    for proposed, accepted, rows, seconds in heard:
        assert len(accepted) == len(rows)
        assert all(len(row) <= proposed and kept <= len(row) for kept, row in zip(accepted, rows, strict=True))
        assert all(0 < m <= 1 for row in rows for m in row) and seconds is not None and seconds > 0
    assert sum(schedule.verify_cost.count.values()) == dec.stats.rounds
    # A row with fewer tokens left than the draft's index is heard as NaN: that draft brings it nothing.
    assert any(math.isnan(m) for question in asked for m in question)


def test_batch_text_api_and_a_single_padded_row(target, drafts) -> None:
    """`generate` takes the batch path for B > 1 or any padding; `generate_text` with a list of prompts gives plain
    decoding's texts, also with stop strings that end some rows early (taken from the plain output)."""
    ids, mask = left_padded((2, 6))
    config = GenerationConfig(max_new_tokens=12, temperature=0.0, eos_token_id=None, lookahead=3)
    one = generate(target, ids[:1], config, attention_mask=mask[:1], draft_model=drafts["self"])
    assert torch.equal(one, generate(target, ids[:1], config, attention_mask=mask[:1]))
    tok = LetterTokenizer(96)
    prompts = ["hello", "ab", "the cat sat"]
    config = GenerationConfig(max_new_tokens=20, temperature=0.0, eos_token_id=None)
    free = generate_text(target, tok, prompts, config)
    stop = free[1][5:7]  # two characters from the middle of the second row's completion
    config = GenerationConfig(max_new_tokens=20, temperature=0.0, eos_token_id=tok.eos_token_id, stop=[stop])
    plain = generate_text(target, tok, prompts, config)
    assert len(plain[1]) < len(free[1])  # the stop string did cut that row
    assert generate_text(target, tok, prompts, config, draft_model=drafts["self"]) == plain


def test_batch_streaming_blocks_and_stats(target, drafts) -> None:
    ids, mask = left_padded((4, 9, 1))
    config = GenerationConfig(max_new_tokens=20, temperature=0.0, eos_token_id=None, lookahead=4)
    stats = GenerationStats()
    blocks: list[torch.Tensor] = []
    generate(target, ids, config, attention_mask=mask, draft_model=drafts["same"], streamer=blocks.append, stats=stats)
    assert all(b.shape[0] == 3 for b in blocks)
    assert max(b.shape[1] for b in blocks) > 1  # several tokens per round came out together
    assert torch.equal(torch.cat([ids, *blocks], dim=1), generate(target, ids, config, attention_mask=mask))
    assert stats.new_tokens == 20
    extra = stats.extra
    assert extra["proposed"] == extra["accepted"] > 0  # the draft is the target: every draft a row proposes is kept
    assert extra["acceptance_rate"] == extra["alpha"] == 1.0
    assert extra["tokens_per_target_forward"] == pytest.approx(3 * 20 / extra["rounds"])  # summed over rows


def test_batch_counts_only_the_drafts_a_row_could_use(target, drafts) -> None:
    """k follows the row with the most room left; a row nearer its end counts only the drafts it could emit. So
    with no stops, every row-round emits its accepted drafts plus one token, exactly."""
    ids, mask = left_padded((3, 11, 6))
    config = GenerationConfig(max_new_tokens=17, temperature=0.0, eos_token_id=None, lookahead=5)
    dec = BatchSpeculativeDecoder(target, drafts["self"], ids, config, attention_mask=mask)
    row_rounds = 0
    with torch.inference_mode():
        while not dec.done:
            row_rounds += int((~dec.finished).sum())
            dec.step()
    assert dec.stats.new_tokens == 3 * 17
    assert dec.stats.new_tokens == dec.stats.accepted + row_rounds
    assert len(dec.stats.accepted_per_round) == len(dec.stats.lookaheads) == dec.stats.rounds


@needs_kernel
def test_batch_through_the_cpu_kernel_past_16_rows() -> None:
    """With toyllm's CPU kernel, a batch of 4 verifies 4 x (K + 1) = 20 rows in one kernel product and 36 rows through
    torch (the kernel takes up to 32): still plain batched greedy decoding's output, which runs 4 rows through the
    kernel."""
    assert kernels.load() is not None, kernels.unavailable_reason()
    target = kernels.use_cpu_kernels(copy.deepcopy(tiny(0)))
    ids, mask = left_padded((3, 9, 5, 12))
    for K in (4, 8):
        config = GenerationConfig(max_new_tokens=24, temperature=0.0, eos_token_id=None, lookahead=K, max_lookahead=8)
        with KernelCalls() as calls:
            expected = generate(target, ids, config, attention_mask=mask)
        assert 4 in calls.rows  # plain batched decoding: 4 rows a step through the kernel
        with KernelCalls() as calls:
            out, spec = spec_run(target, target.first_layers(2), ids, mask, config)
        assert torch.equal(out, expected)
        assert max(spec.lookaheads) == K
        widest = 4 * (K + 1)  # the first round verifies K drafts + 1 for all 4 rows
        assert (widest in calls.rows) is (widest <= kernels.MAX_ROWS)  # 20 rows through the kernel, 36 through torch


# -- the output distribution of every row is the target's ---------------------------------------------------------

PROMPTS = (torch.tensor([[3]]), torch.tensor([[5, 1]]))
ROWS = 16  # rows per batch, alternating between the two prompts (one of them left-padded)


def batch_prompts() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([[0, 3], [5, 1]] * (ROWS // 2))
    mask = torch.tensor([[0, 1], [1, 1]] * (ROWS // 2))
    return ids, mask


def sample_rows(decoder_cls, target, draft, config, n: int, schedule=None) -> tuple[list[torch.Tensor], float]:
    """Counts of n sampled 3-token continuations of each prompt, [(V^3,), (V^3,)], and the acceptance rate."""
    ids, mask = batch_prompts()
    counts = [torch.zeros(V**3, dtype=torch.float64) for _ in PROMPTS]
    proposed = accepted = 0
    with torch.inference_mode():
        for run in range(n * len(PROMPTS) // ROWS):
            config.seed = run
            dec = decoder_cls(
                target, draft, ids, config, attention_mask=mask, schedule=schedule(config) if schedule else None
            )
            while not dec.done:
                dec.step()
            for row in range(ROWS):
                a, b, c = dec.tokens[row, 2:5].tolist()
                counts[row % 2][(a * V + b) * V + c] += 1
            proposed, accepted = proposed + dec.stats.proposed, accepted + dec.stats.accepted
    return counts, accepted / proposed


class RowMixupDecoder(BatchSpeculativeDecoder):
    """BROKEN on purpose: each row is verified against the target distributions of the row verified before it (a
    batch-indexing bug). Neighbouring rows hold different prompts, so their distributions differ."""

    previous: list[torch.Tensor] = []

    @staticmethod
    def _verify(drafts, q, p, generator=None):  # type: ignore[override]
        before = RowMixupDecoder.previous
        other = before[0] if before and before[0].shape == p.shape else p
        before[:] = [p]
        return verify_drafts(drafts, q, other, generator)


class RawQBatchDecoder(BatchSpeculativeDecoder):
    """BROKEN on purpose: samples from the processed distribution but reports q from the unprocessed logits."""

    def _draft_tokens(self, logits, processed):
        token, _ = super()._draft_tokens(logits, processed)
        return token, torch.softmax(logits.float(), dim=-1)


@pytest.mark.slow
@pytest.mark.parametrize(
    "knobs, schedule",
    [(PLAIN, fixed_threshold), (FILTERED_T1, None), (FILTERED, None)],
    ids=["temperature1-threshold-schedule", "temperature1-topk-topp", "temperature0.7-topk-topp-penalty"],
)
def test_batch_distribution_is_exactly_the_targets(small_pair, knobs, schedule) -> None:
    target, draft = small_pair
    config = dist_config(knobs)
    counts, alpha = sample_rows(BatchSpeculativeDecoder, target, draft, config, N_SAMPLES, schedule)
    assert 0.1 < alpha < 0.9
    for prompt, c in zip(PROMPTS, counts, strict=True):
        assert c.sum() == N_SAMPLES
        p_value = chi_square_p_value(c, exact_continuations(target, prompt, 3, config))
        print(f"prompt {prompt.tolist()}: acceptance {alpha:.3f}, chi-square p-value {p_value:.3g}")
        assert p_value > ALPHA


@pytest.mark.slow
@pytest.mark.parametrize(
    "broken, knobs", [(RowMixupDecoder, PLAIN), (RawQBatchDecoder, FILTERED)], ids=["row-mixup", "q-from-raw-logits"]
)
def test_the_batch_test_catches_broken_variants(small_pair, broken, knobs) -> None:
    target, draft = small_pair
    config = dist_config(knobs)
    counts, _ = sample_rows(broken, target, draft, config, N_BROKEN)
    p_values = [
        chi_square_p_value(c, exact_continuations(target, p, 3, config)) for p, c in zip(PROMPTS, counts, strict=True)
    ]
    print(f"chi-square p-values of the broken decoder {p_values}")
    assert min(p_values) < ALPHA


V_SMALL = 4


def compaction_case(decoder_cls, samples: int) -> list[float]:
    """A 7-slot window and 4 new tokens, so nearly every run compacts its caches while rows are still live, drafts
    are replayed, and rows end at different rounds. Chi-square p-values of each prompt's 4-token continuation (256
    outcomes), `samples` per prompt, with a repetition penalty."""
    kw = dict(vocab=V_SMALL, n_layer=1, n_positions=7, std=0.7)
    target, draft = tiny(0, **kw), tiny(1, **kw)
    ids = torch.tensor([[0, 0, 2], [1, 3, 2]] * (ROWS // 2))
    mask = torch.tensor([[0, 0, 1], [1, 1, 1]] * (ROWS // 2))
    config = GenerationConfig(
        max_new_tokens=4, temperature=1.0, top_k=0, eos_token_id=None, lookahead=2, repetition_penalty=1.2
    )
    counts = [torch.zeros(V_SMALL**4, dtype=torch.float64) for _ in range(2)]
    weights = V_SMALL ** torch.arange(3, -1, -1)  # a continuation's index in exact_continuations' order
    runs = samples * 2 // ROWS
    compacted = 0
    with torch.inference_mode():
        for run in range(runs):
            config.seed = run
            dec = run_to_end(decoder_cls(target, draft, ids, config, attention_mask=mask))
            compacted += dec.stats.compactions > 0
            for row, code in enumerate((dec.tokens[:, 3:7] * weights).sum(dim=1).tolist()):
                counts[row % 2][code] += 1
    assert compacted > 0.9 * runs  # (a run where every row rejects every draft leaves no holes)
    p_values = []
    for prompt, c in zip((torch.tensor([[2]]), torch.tensor([[1, 3, 2]])), counts, strict=True):
        assert c.sum() == samples
        p_values.append(chi_square_p_value(c, exact_continuations(target, prompt, 4, config)))
    print(f"chi-square p-values {p_values}")
    return p_values


class NoResidualBatchDecoder(BatchSpeculativeDecoder):
    """BROKEN on purpose: after a rejection it samples from p instead of normalize(max(0, p - q))."""

    _verify = staticmethod(NoResidualDecoder._verify)


@pytest.mark.slow
def test_batch_distribution_is_exact_through_compactions() -> None:
    assert min(compaction_case(BatchSpeculativeDecoder, N_SAMPLES)) > ALPHA


@pytest.mark.slow
def test_the_compaction_test_catches_a_broken_variant() -> None:
    assert min(compaction_case(NoResidualBatchDecoder, N_BROKEN)) < ALPHA


# -- caches: each row's visible slots are a fresh prefill of its accepted tokens -----------------------------------


def assert_row_cache(cache, slot_ok, length: int, model: GPT2LMHeadModel, row: int, ids: torch.Tensor) -> None:
    """Row `row`'s visible slots among the first `length` hold exactly a one-row prefill of `ids`."""
    visible = slot_ok[row, :length].nonzero().flatten()
    assert visible.numel() == ids.numel()
    if not ids.numel():
        return
    ref = fresh_cache(model, ids)
    for layer in range(model.config.n_layer):
        for got, want in ((cache.k[layer], ref.k[layer]), (cache.v[layer], ref.v[layer])):
            torch.testing.assert_close(got[row][:, visible], want[0][:, : ids.numel()], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("temperature", [1.0, 0.0])
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("n_positions", [64, 30])
def test_batch_caches_equal_fresh_prefill_after_every_round(n_positions: int, layers: int, temperature: float) -> None:
    """Self drafts of 1 and 2 of 3 layers: rows accept different numbers of drafts (holes), and rows that accept
    every draft leave the draft one slot behind, also when a compaction comes."""
    target = tiny(0, n_positions=n_positions)
    draft = target.first_layers(layers)
    ids, mask = left_padded((5, 1, 8))
    config = GenerationConfig(
        max_new_tokens=20, temperature=temperature, top_k=0, seed=1, eos_token_id=None, lookahead=3
    )
    dec = BatchSpeculativeDecoder(target, draft, ids, config, attention_mask=mask)
    with torch.inference_mode():
        while not dec.done:
            dec.step()
            for row in range(3):
                if dec.finished[row]:
                    continue
                seq = dec.tokens[row, : dec.next_column[row]][dec.token_ok[row, : dec.next_column[row]]]
                assert seq.numel() == dec.next_column[row] - dec.padding[row]
                # The target holds every accepted token but the newest; the draft holds a prefix of that.
                assert_row_cache(dec.target_cache, dec.slot_ok, dec.target_cache.length, target, row, seq[:-1])
                seen = int(dec.slot_ok[row, : dec.draft_cache.length].sum())
                assert_row_cache(dec.draft_cache, dec.slot_ok, dec.draft_cache.length, draft, row, seq[:seen])
    assert dec.stats.new_tokens == 3 * 20
    assert (dec.stats.compactions > 0) == (n_positions == 30)  # the small window is compacted mid-generation


# -- errors ---------------------------------------------------------------------------------------------------------


def test_batch_errors(target, drafts) -> None:
    ids, mask = left_padded((3, 40))
    config = GenerationConfig(max_new_tokens=30, temperature=0.0)
    with pytest.raises(InvalidArgumentError, match="stays inside the context window"):
        generate(target, ids, config, attention_mask=mask, draft_model=drafts["self"])
    mask[0] = 0
    with pytest.raises(InvalidArgumentError, match="at least one token"):
        generate(target, ids, GenerationConfig(max_new_tokens=3), attention_mask=mask, draft_model=drafts["self"])


# -- the benchmark's batched mode ------------------------------------------------------------------------------------


def test_bench_speculative_batch(tmp_path) -> None:
    from toyllm.bench.speculative import run_speculative_bench

    kw = dict(target="random:gpt2-tiny", cases=("self",), self_layers=1, lookaheads=(2,), max_new_tokens=8)
    results = run_speculative_bench(**kw, prompt_tokens=5, prompts=2, batch=3, device="cpu", out_dir=tmp_path)
    assert results["settings"]["batch"] == 3
    (row,) = results["rows"]
    assert row["outputs_match"] is True  # batched speculative == plain batched greedy, every run
    tokens = 2 * 3 * 8  # 2 batches of 3 prompts, every row makes all its tokens (EOS ignored)
    assert row["tokens_per_second"] * row["seconds"]["total"] == pytest.approx(tokens)
    assert row["prompt_forwards"] == 2 * 2  # both models filled once per batch
    plain = results["plain"]["self"]["target"]
    assert plain["token_seconds"] == pytest.approx(plain["step_seconds"] / 3)  # a plain step decodes 3 rows
    decode_token = (row["seconds"]["total"] - row["seconds"]["prompt"]) / tokens
    assert row["decode_speedup"] == pytest.approx(plain["token_seconds"] / decode_token)
    with pytest.raises(InvalidArgumentError, match="--batch needs"):
        run_speculative_bench(**kw, prompt_tokens=1020, batch=2, device="cpu")


@pytest.mark.parametrize("layers", [1, 2])
def test_compacting_after_every_round_is_exact(layers: int) -> None:
    """Compaction forced after every round (whatever the draft's lag) keeps both caches a fresh prefill of each row
    and the output plain batched greedy decoding's."""
    target = tiny(0)
    draft = target.first_layers(layers)
    ids, mask = left_padded((5, 1, 8))
    config = GenerationConfig(max_new_tokens=20, temperature=0.0, eos_token_id=None, lookahead=3)
    dec = BatchSpeculativeDecoder(target, draft, ids, config, attention_mask=mask)
    lagged = 0
    with torch.inference_mode():
        while not dec.done:
            dec.step()
            lagged += dec.draft_cache.length < dec.target_cache.length
            dec._compact()
            assert dec.draft_cache.length == dec.target_cache.length
            for row in range(3):
                if dec.finished[row]:
                    continue
                seq = dec.tokens[row, : dec.next_column[row]][dec.token_ok[row, : dec.next_column[row]]]
                assert_row_cache(dec.target_cache, dec.slot_ok, dec.target_cache.length, target, row, seq[:-1])
                assert_row_cache(dec.draft_cache, dec.slot_ok, dec.draft_cache.length, draft, row, seq[:-1])
    assert lagged > 0  # some compactions found the draft a slot behind
    expected = generate(target, ids, config, attention_mask=mask)
    assert torch.equal(dec.tokens[:, : expected.shape[1]], expected)
