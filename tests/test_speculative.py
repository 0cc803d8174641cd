"""Speculative sampling: greedy equality, exact output distribution, cache rollback, stops, schedules, errors.

The distribution tests are statistical. Each draws N = 20,000 speculative samples of the next 3 tokens and compares
their empirical joint distribution with the target's exact one (enumerated over all vocab^3 continuations) by a
chi-square goodness-of-fit test that fails when p < ALPHA = 1e-3: for a correct implementation and a random seed,
each such test raises a false alarm with probability 0.001. The seeds are fixed, so the outcome is reproducible.
The same test (statistic and threshold) is run on three deliberately broken decoders kept below (no residual
distribution; q taken from the unprocessed logits; the temperature dropped); each must fail it, and they do with
only N_BROKEN = 5,000 samples (fewer samples only make a failure harder to reach, and keep CI short).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from toyllm.errors import InvalidArgumentError
from toyllm.generation import GenerationConfig, GenerationStats, generate, generate_text, stream_text
from toyllm.gpt2 import GPT2Config, GPT2LMHeadModel
from toyllm.kv_cache import KVCache
from toyllm.sampling import process_logits
from toyllm.speculative import (
    HeuristicSchedule,
    SpeculativeDecoder,
    SpeculativeStats,
    ThresholdSchedule,
    VerifyCost,
    batch_speculative_stream,
    speculative_stream,
    verify_drafts,
    verify_greedy,
)
from toyllm.speculative.verify import draw

ALPHA = 1e-3  # false-alarm rate of each distribution test
N_SAMPLES = 20_000
N_BROKEN = 5_000


def tiny(
    seed: int, vocab: int = 96, n_layer: int = 3, n_positions: int = 64, std: float = 0.3, **kw
) -> GPT2LMHeadModel:
    """A random GPT-2. The larger init (0.3, not 0.02) makes predictions depend on the context."""
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=vocab, n_positions=n_positions, n_embd=16, n_layer=n_layer, n_head=2, initializer_range=std, **kw
    )
    return GPT2LMHeadModel(cfg).eval()


def prompts(vocab: int, lengths: tuple[int, ...] = (1, 2, 5, 9, 20)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    return [torch.randint(0, vocab, (1, n), generator=g) for n in lengths]


def spec_generate(target, draft, ids, config, **kw) -> tuple[torch.Tensor, SpeculativeStats]:
    spec = SpeculativeStats()
    out = torch.cat([ids, *speculative_stream(target, draft, ids, config, spec_stats=spec, **kw)], dim=1)
    return out, spec


@pytest.fixture(scope="module")
def target() -> GPT2LMHeadModel:
    return tiny(0)


@pytest.fixture(scope="module")
def drafts(target: GPT2LMHeadModel) -> dict[str, GPT2LMHeadModel]:
    # An unrelated model: other seed, one layer, untied head, so it rarely agrees with the target.
    unrelated = tiny(7, n_layer=1, tie_word_embeddings=False)
    # The target itself (all its layers, shared) scoring only half the vocabulary: it agrees whenever the target's
    # greedy token is one it can propose.
    restricted = target.first_layers(target.config.n_layer)
    restricted.restrict_vocab(range(0, 96, 2))
    return {"same": target, "unrelated": unrelated, "self": target.first_layers(1), "restricted": restricted}


# -- greedy: the output is the target's own greedy output ---------------------------------------------------------


@pytest.mark.parametrize("K", [1, 2, 4, 8])
@pytest.mark.parametrize("kind", ["same", "unrelated", "self", "restricted"])
def test_greedy_equals_target_greedy(target, drafts, kind: str, K: int) -> None:
    config = GenerationConfig(max_new_tokens=24, temperature=0.0, eos_token_id=None, lookahead=K, max_lookahead=8)
    total = SpeculativeStats()
    for ids in prompts(96):  # prompts of 1 to 20 tokens
        expected = generate(target, ids, config)
        out, spec = spec_generate(target, drafts[kind], ids, config)
        assert torch.equal(out, expected)
        total.proposed += spec.proposed
        total.accepted += spec.accepted
    if kind == "same":
        assert total.acceptance_rate == 1.0
    if kind == "unrelated":
        assert total.acceptance_rate < 0.1
    if kind == "restricted":  # accepted exactly when the target's token is an even id
        assert 0 < total.acceptance_rate < 1


@pytest.mark.parametrize("schedule", ["heuristic", "threshold"])
def test_greedy_equality_with_adaptive_schedules(target, drafts, schedule: str) -> None:
    config = GenerationConfig(
        max_new_tokens=30, temperature=0.0, eos_token_id=None, lookahead=2, lookahead_schedule=schedule
    )
    for kind in ("same", "unrelated", "self"):
        for ids in prompts(96, (3, 12)):
            assert torch.equal(spec_generate(target, drafts[kind], ids, config)[0], generate(target, ids, config))


def test_greedy_past_a_small_window_and_penalty() -> None:
    """Window slides every few tokens (n_positions 12) and a repetition penalty that sees drafted tokens."""
    target = tiny(3, n_positions=12)
    draft = tiny(4, n_layer=1, n_positions=8)  # a smaller window than the target's: it slides on its own
    config = GenerationConfig(
        max_new_tokens=40, temperature=0.0, eos_token_id=None, lookahead=4, repetition_penalty=1.3, window_keep=5
    )
    for ids in prompts(96, (1, 6, 15)):
        expected = generate(target, ids, config)
        assert torch.equal(spec_generate(target, draft, ids, config)[0], expected)
        assert torch.equal(spec_generate(target, target.first_layers(2), ids, config)[0], expected)


def test_prompt_seconds_count_each_prompt_once_and_no_slide() -> None:
    """`prompt_seconds` (left out of the bench's decode speedup) holds each model's first fill per generation.

    One `SpeculativeStats` adds up several prompts, as in the bench; the windows slide and refill many times.
    """
    target, draft = tiny(3, n_positions=12), tiny(4, n_layer=1, n_positions=8)
    config = GenerationConfig(max_new_tokens=40, temperature=0.0, eos_token_id=None, lookahead=4, window_keep=5)
    stats = SpeculativeStats()
    expected = 0
    for length in (1, 10, 12):  # 1: the target has no prefill; 12 = the target's window: no draft in round 1
        ids = torch.arange(1, length + 1)[None]
        out = torch.cat([ids, *speculative_stream(target, draft, ids, config, spec_stats=stats)], dim=1)
        assert torch.equal(out, generate(target, ids, config))
        expected += 1 + (length > 1)  # the draft's first forward, and the target's prefill of all but one token
        assert stats.prompt_forwards == expected
    assert stats.draft_prefills > 3  # the windows slid and were refilled: not counted as prompt
    prefill_seconds = stats.draft_prefill_seconds + stats.target_seconds - stats.verify_seconds
    assert 0 < stats.prompt_seconds < prefill_seconds
    assert 0 < stats.decode_seconds < stats.total_seconds


def test_a_round_waits_for_the_device_only_where_it_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU every synchronize drains the queue, so a round must not add its own where a read already waits: a
    greedy round synchronizes once (at its end), plus once per target prefill. A draft step that the schedule
    discards without reading anything (no confidence asked) is the one place that still needs its own, so that its
    time is the forward's and not only the launch's. `_sync` does nothing on the CPU; here it is counted instead."""
    from toyllm.speculative import decode
    from toyllm.speculative.schedules import ConstantSchedule

    calls = []
    monkeypatch.setattr(decode, "_sync", lambda device: calls.append(device))

    class StopAfterTwo(ConstantSchedule):  # asks for no confidence, then turns the third draft down
        refused = 0

        def keep_drafting(self, index: int, confidence: float) -> bool:
            self.refused += index > 2
            return index <= 2

    target, draft = tiny(3), tiny(4, n_layer=1)
    ids = torch.arange(1, 6)[None]  # 5 tokens: the target prefills 4 in the first round
    for schedule in (None, StopAfterTwo):
        config = GenerationConfig(max_new_tokens=30, temperature=0.0, eos_token_id=None, lookahead=4)
        calls.clear()
        made = schedule(config) if schedule is not None else None
        out, stats = spec_generate(target, draft, ids, config, schedule=made)
        assert torch.equal(out, generate(target, ids, config))
        prefills = stats.target_forwards - stats.rounds
        assert prefills == 1
        if schedule is None:
            assert stats.draft_forwards == sum(stats.lookaheads)
            assert len(calls) == stats.rounds + prefills
        else:
            assert isinstance(made, StopAfterTwo)
            broke = made.refused  # each refusal discarded a draft forward: the third one
            assert broke > 0 and max(stats.lookaheads) == 2 and stats.draft_forwards == sum(stats.lookaheads) + broke
            assert len(calls) == stats.rounds + prefills + broke


def test_stats_total_adds_separate_runs_like_one_shared_stats() -> None:
    """The bench keeps each prompt's fastest run and adds their stats: the sum equals one shared SpeculativeStats."""
    target, draft = tiny(3, n_positions=12), tiny(4, n_layer=1, n_positions=8)
    config = GenerationConfig(max_new_tokens=25, temperature=0.0, eos_token_id=None, lookahead=3, window_keep=5)
    shared, parts = SpeculativeStats(), []
    for length in (2, 7):
        ids = torch.arange(1, length + 1)[None]
        list(speculative_stream(target, draft, ids, config, spec_stats=shared))
        parts.append(SpeculativeStats())
        list(speculative_stream(target, draft, ids, config, spec_stats=parts[-1]))
    total = SpeculativeStats.total(parts)
    counts = ("rounds", "proposed", "accepted", "rejected", "new_tokens", "target_forwards", "draft_forwards")
    for name in (*counts, "draft_prefills", "prompt_forwards", "lookaheads", "accepted_per_round"):
        assert getattr(total, name) == getattr(shared, name), name
    assert total.rounds > parts[0].rounds > 0 and total.new_tokens == 50
    assert total.total_seconds == pytest.approx(parts[0].total_seconds + parts[1].total_seconds)
    assert SpeculativeStats.total([]) == SpeculativeStats()


# -- the acceptance rule on its own -------------------------------------------------------------------------------


def test_verify_drafts_cases() -> None:
    p = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    q = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert verify_drafts(torch.tensor([1, 0]), q, p) == (1, 2)  # second draft rejected, residual = target's token
    assert verify_drafts(torch.tensor([1, 2]), torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]), p) == (2, 0)  # bonus
    assert verify_drafts(torch.zeros(0, dtype=torch.long), torch.zeros(0, 3), p[:1]) == (0, 1)  # no drafts


def test_verify_greedy_is_verify_drafts_on_one_hots() -> None:
    """The temperature-0 shortcut decides exactly what the general rule decides when p and q are one-hots."""
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        K = int(torch.randint(0, 5, (1,), generator=g))
        target = torch.randint(0, 3, (K + 1,), generator=g)  # a 3-token vocabulary: matches are common
        drafts = torch.where(torch.rand(K, generator=g) < 0.7, target[:K], torch.randint(0, 3, (K,), generator=g))
        p, q = F.one_hot(target, 3).float(), F.one_hot(drafts, 3).float()
        assert verify_greedy(drafts, target) == verify_drafts(drafts, q, p, g)


def test_residual_exactness_one_position() -> None:
    """One position, by enumeration: q(x) min(1, p/q) + P(reject) residual(x) == p(x)."""
    g = torch.Generator().manual_seed(0)
    p, q = torch.rand(6, generator=g).softmax(0), torch.rand(6, generator=g).softmax(0)
    from toyllm.speculative import residual_distribution

    reject = (q - torch.minimum(p, q)).sum()
    emitted = torch.minimum(p, q) + reject * residual_distribution(p, q)
    torch.testing.assert_close(emitted, p)


# -- the output distribution is the target's, exactly -------------------------------------------------------------

V = 8  # small vocabulary: all 8^3 = 512 continuations can be enumerated


def exact_continuations(model: GPT2LMHeadModel, prompt: torch.Tensor, n: int, config: GenerationConfig) -> torch.Tensor:
    """P(x_1 .. x_n | prompt) for every n-token continuation, (V^n,) with the first token most significant, by
    enumeration and with the same logit processing as sampling."""
    vocab = model.config.vocab_size
    outs = torch.tensor(list(itertools.product(range(vocab), repeat=n)))  # (V^n, n)
    seqs = torch.cat([prompt.expand(len(outs), -1), outs], dim=1)  # (V^n, T0 + n)
    with torch.no_grad():
        logits = model(seqs)  # (V^n, T0 + n, V), no cache: the plain reference path
    T0 = prompt.shape[1]
    log_p = torch.zeros(len(outs), dtype=torch.float64)
    for j in range(n):  # position T0 - 1 + j predicts x_{j+1} from the prompt and x_1 .. x_j
        processed = process_logits(
            logits[:, T0 - 1 + j],
            seqs[:, : T0 + j],
            temperature=config.temperature,
            top_k=config.top_k,
            top_p=config.top_p,
            repetition_penalty=config.repetition_penalty,
        )
        log_p += torch.log_softmax(processed.double(), dim=-1).gather(1, outs[:, j : j + 1]).squeeze(1)
    return log_p.exp()


def sample_next3(decoder_cls, target, draft, prompt, config, n: int, schedule=None) -> tuple[torch.Tensor, float]:
    """Counts of the n sampled 3-token continuations, (V^3,), and the acceptance rate."""
    counts = torch.zeros(V**3, dtype=torch.float64)
    proposed = accepted = 0
    T0 = prompt.shape[1]
    with torch.inference_mode():
        for i in range(n):
            config.seed = i
            dec = decoder_cls(target, draft, prompt, config, schedule=schedule(config) if schedule else None)
            while not dec.done:
                dec.step()
            a, b, c = dec.tokens[T0 : T0 + 3].tolist()
            counts[(a * V + b) * V + c] += 1
            proposed, accepted = proposed + dec.stats.proposed, accepted + dec.stats.accepted
    return counts, accepted / proposed


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> float:
    """Pearson's chi-square goodness of fit; cells expected below `min_expected` are pooled into one.

    A sample in a cell of probability 0 (outside top-k / top-p) is an outright failure: p = 0.
    The p-value is the chi-square survival function, Q(dof / 2, stat / 2), the regularised upper incomplete gamma.
    """
    if bool((counts[probs == 0] > 0).any()):
        return 0.0
    expected = probs * counts.sum()
    big = expected >= min_expected
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    stat = ((obs - exp) ** 2 / exp).sum()
    dof = torch.tensor((obs.numel() - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(dof, stat / 2))


PLAIN = dict(temperature=1.0, top_k=0)
# Temperature 0.7, not 1: at 1 a decoder that dropped the temperature would pass unseen (NoTemperatureDecoder).
FILTERED = dict(temperature=0.7, top_k=5, top_p=0.9, repetition_penalty=1.5)
FILTERED_T1 = dict(temperature=1.0, top_k=5, top_p=0.9)  # the case: temperature 1 with top-k and top-p


def dist_config(knobs: dict) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=3, eos_token_id=None, lookahead=2, **knobs)


def fixed_threshold(config: GenerationConfig) -> ThresholdSchedule:
    """The threshold schedule with c and v(k) fixed, so that K does not depend on timings (the test is reproducible)."""
    return ThresholdSchedule(config, cost_ratio=0.25, verify_slope=0.0)


class NoResidualDecoder(SpeculativeDecoder):
    """BROKEN on purpose: after a rejection it samples from p instead of normalize(max(0, p - q))."""

    @staticmethod
    def _verify(drafts, q, p, generator=None):  # type: ignore[override]
        u = torch.rand(drafts.shape[0], generator=generator, device=p.device)
        for i, x in enumerate(drafts.tolist()):
            if not u[i] * q[i, x] < p[i, x]:
                return i, draw(p[i], generator)
        return drafts.shape[0], draw(p[-1], generator)


class RawQDecoder(SpeculativeDecoder):
    """BROKEN on purpose: samples from the processed distribution but reports q from the unprocessed logits."""

    def _draft_token(self, logits, processed):
        token, _ = super()._draft_token(logits, processed)
        return token, torch.softmax(logits.float(), dim=-1)[0]


class NoTemperatureDecoder(SpeculativeDecoder):
    """BROKEN on purpose: processes both models' logits at temperature 1, whatever the config says."""

    def _process(self, logits, previous, valid=None):
        c = self.config
        penalty = c.repetition_penalty
        return process_logits(
            logits, previous if penalty != 1.0 else None, temperature=1.0, top_k=c.top_k, top_p=c.top_p,
            repetition_penalty=penalty, valid=valid,
        )  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    "knobs, schedule",
    [(PLAIN, fixed_threshold), (FILTERED_T1, None), (FILTERED, None)],
    ids=["temperature1-threshold-schedule", "temperature1-topk-topp", "temperature0.7-topk-topp-penalty"],
)
def test_distribution_is_exactly_the_targets(small_pair, knobs, schedule) -> None:
    target, draft = small_pair
    config, prompt = dist_config(knobs), torch.tensor([[3]])
    counts, alpha = sample_next3(SpeculativeDecoder, target, draft, prompt, config, N_SAMPLES, schedule)
    p_value = chi_square_p_value(counts, exact_continuations(target, prompt, 3, config))
    print(f"acceptance {alpha:.3f}, chi-square p-value {p_value:.3g}")
    assert 0.1 < alpha < 0.9  # rejections and acceptances both happen, so the residual path is exercised
    assert p_value > ALPHA


@pytest.mark.slow
def test_distribution_is_exact_with_a_restricted_draft(small_pair) -> None:
    """A draft that can only propose 5 of the 8 tokens (q = 0 on the rest) still gives the target's distribution:
    the residual max(0, p - q) puts the missing mass back."""
    target, draft = small_pair
    restricted = draft.first_layers(draft.config.n_layer)  # the same weights, its own head settings
    restricted.restrict_vocab([0, 2, 3, 5, 6])
    config, prompt = dist_config(PLAIN), torch.tensor([[3]])
    counts, alpha = sample_next3(SpeculativeDecoder, target, restricted, prompt, config, N_SAMPLES)
    p_value = chi_square_p_value(counts, exact_continuations(target, prompt, 3, config))
    print(f"acceptance {alpha:.3f}, chi-square p-value {p_value:.3g}")
    assert 0.1 < alpha < 0.9
    assert p_value > ALPHA


@pytest.mark.slow
@pytest.mark.parametrize(
    "broken, knobs",
    [(NoResidualDecoder, PLAIN), (RawQDecoder, FILTERED), (NoTemperatureDecoder, FILTERED)],
    ids=["no-residual", "q-from-raw-logits", "temperature-dropped"],
)
def test_the_same_test_catches_broken_variants(small_pair, broken, knobs) -> None:
    target, draft = small_pair
    config, prompt = dist_config(knobs), torch.tensor([[3]])
    counts, _ = sample_next3(broken, target, draft, prompt, config, N_BROKEN)
    p_value = chi_square_p_value(counts, exact_continuations(target, prompt, 3, config))
    print(f"chi-square p-value of the broken decoder {p_value:.3g}")
    assert p_value < ALPHA


def test_chi_square_helper_is_calibrated() -> None:
    """Exact multinomial samples pass; a 10% tilt of 20,000 samples does not."""
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(64, generator=g, dtype=torch.float64).softmax(0)
    counts = torch.bincount(torch.multinomial(probs, N_SAMPLES, True, generator=g), minlength=64).double()
    assert chi_square_p_value(counts, probs) > ALPHA
    tilted = probs * torch.linspace(0.9, 1.1, 64, dtype=torch.float64)
    counts = torch.bincount(torch.multinomial(tilted, N_SAMPLES, True, generator=g), minlength=64).double()
    assert chi_square_p_value(counts, probs) < ALPHA


# -- caches: rolled back to exactly the accepted tokens, nothing accepted recomputed ------------------------------


def fresh_cache(model: GPT2LMHeadModel, ids: torch.Tensor) -> KVCache:
    cache = KVCache.for_model(model, 1)
    if ids.numel():
        with torch.no_grad():
            model(ids[None], cache=cache)
    return cache


def assert_cache_equals_prefill(cache: KVCache, model: GPT2LMHeadModel, ids: torch.Tensor) -> None:
    assert cache.length == ids.numel()
    ref = fresh_cache(model, ids)
    for layer in range(model.config.n_layer):
        n = cache.length
        torch.testing.assert_close(cache.k[layer][:, :, :n], ref.k[layer][:, :, :n], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(cache.v[layer][:, :, :n], ref.v[layer][:, :, :n], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["same", "unrelated", "self"])
@pytest.mark.parametrize("n_positions", [64, 12])
@pytest.mark.parametrize(
    "schedule, temperature", [("constant", 1.0), ("constant", 0.0), ("heuristic", 1.0), ("threshold", 0.0)]
)
def test_caches_equal_fresh_prefill_after_every_round(
    kind: str, n_positions: int, schedule: str, temperature: float
) -> None:
    """After every round, whatever the schedule (threshold rounds stop early and drop a draft forward) and at
    temperature 0 (greedy verification) as at 1."""
    target = tiny(0, n_positions=n_positions)
    draft = {"same": target, "unrelated": tiny(7, n_layer=1, n_positions=n_positions), "self": target.first_layers(1)}
    fed: list[int] = []  # tokens the target was fed, per forward
    config = GenerationConfig(
        max_new_tokens=30, temperature=temperature, top_k=0, seed=1, eos_token_id=None, lookahead=3,
        lookahead_schedule=schedule, max_lookahead=6,
    )  # fmt: skip
    made = fixed_threshold(config) if schedule == "threshold" else None  # K independent of timings
    dec = SpeculativeDecoder(target, draft[kind], prompts(96, (5,))[0], config, schedule=made)

    def record(module, args, kwargs) -> None:
        if kwargs.get("cache") is dec.target_window.cache:
            fed.append(args[0].shape[1])

    hook = target.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.inference_mode():
            while not dec.done:
                dec.step()
                L, tw, dw = dec.length, dec.target_window, dec.draft_window
                if dec.done:
                    break
                assert tw.end == L - 1  # the target holds everything accepted but the newest token
                assert dw.end <= L - 1
                assert_cache_equals_prefill(tw.cache, target, dec.tokens[tw.start : tw.end])
                assert_cache_equals_prefill(dw.cache, dw.model, dec.tokens[dw.start : dw.end])
    finally:
        hook.remove()
    if n_positions == 64 and kind != "same":  # no slide: the prompt (minus its last token), then k + 1 per round
        assert fed == [4] + [k + 1 for k in dec.stats.lookaheads]
    assert dec.stats.new_tokens == 30


def test_self_draft_shares_the_targets_weights_without_a_copy() -> None:
    """`first_layers` lists the target's own modules again: every draft parameter IS a target parameter (same
    storage), so a change to the target is the draft's too, and the draft costs no memory of its own."""
    target = tiny(0)
    draft = target.first_layers(2)
    target_storage = {p.data_ptr() for p in target.parameters()}
    assert {p.data_ptr() for p in draft.parameters()} <= target_storage
    assert sum(p.numel() for p in draft.parameters()) < sum(p.numel() for p in target.parameters())
    with torch.no_grad():
        target.transformer.h[0].attn.c_attn.weight.add_(1.0)
        target.transformer.ln_f.weight.mul_(2.0)
    assert torch.equal(draft.transformer.h[0].attn.c_attn.weight, target.transformer.h[0].attn.c_attn.weight)
    assert torch.equal(draft.transformer.ln_f.weight, target.transformer.ln_f.weight)


# -- stops, streaming, statistics -------------------------------------------------------------------------------


class LetterTokenizer:
    """Token i is one character; enough for stop strings and streaming text."""

    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ.,;:!?-+*/=()[]{}<>@#$%^&_~|'\" \n\t`"

    def __init__(self, vocab: int) -> None:
        self.chars = self.alphabet[:vocab]
        self.eos_token_id = vocab - 1

    def encode(self, text: str) -> list[int]:
        return [self.chars.index(c) for c in text]

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in list(ids))

    def decode_bytes(self, ids) -> bytes:
        return self.decode(ids).encode()


@pytest.mark.parametrize("kind", ["same", "unrelated"])
def test_stops_at_eos_and_stop_strings_like_plain(target, drafts, kind: str) -> None:
    tok = LetterTokenizer(96)
    ids = prompts(96, (4,))[0]
    free = generate(target, ids, GenerationConfig(max_new_tokens=30, temperature=0.0, eos_token_id=None))
    new = free[0, 4:].tolist()
    for config in (
        GenerationConfig(max_new_tokens=30, temperature=0.0, eos_token_id=new[6], lookahead=4),
        GenerationConfig(max_new_tokens=30, temperature=0.0, eos_token_id=None, stop=[tok.decode(new[7:9])]),
        GenerationConfig(max_new_tokens=5, temperature=0.0, eos_token_id=None, lookahead=8),
    ):
        expected = generate(target, ids, config, tokenizer=tok)
        assert expected.shape[1] < free.shape[1]  # it did stop early
        out = torch.cat([ids, *speculative_stream(target, drafts[kind], ids, config, tokenizer=tok)], dim=1)
        assert torch.equal(out, expected)


def test_stats_count_only_drafts_emitted_before_a_stop(target, drafts) -> None:
    """The draft is the target, so all 8 drafts of the one round are accepted; EOS ends the output inside them. The
    statistics count the accepted drafts that came out, not the ones cut off after the stop."""
    ids = prompts(96, (4,))[0]
    free = generate(target, ids, GenerationConfig(max_new_tokens=30, temperature=0.0, eos_token_id=None))
    config = GenerationConfig(max_new_tokens=30, temperature=0.0, eos_token_id=int(free[0, 4 + 5]), lookahead=8)
    made = generate(target, ids, config).shape[1] - 4  # up to and including the first EOS: 6 or fewer
    assert made <= 6
    for decoder in (speculative_stream, batch_speculative_stream):
        spec = SpeculativeStats()
        out = torch.cat([ids, *decoder(target, drafts["same"], ids, config, spec_stats=spec)], dim=1)
        assert out.shape[1] - 4 == spec.new_tokens == made
        assert (spec.rounds, spec.proposed, spec.accepted, spec.rejected) == (1, 8, made, 0), decoder.__name__


def test_streaming_blocks_and_text(target, drafts) -> None:
    tok = LetterTokenizer(96)
    config = GenerationConfig(max_new_tokens=20, temperature=0.0, eos_token_id=None, lookahead=4, stop=["zz"])
    blocks: list[torch.Tensor] = []
    ids = prompts(96, (3,))[0]
    out = generate(target, ids, config, tokenizer=tok, draft_model=drafts["same"], streamer=blocks.append)
    assert all(b.shape[0] == 1 and b.shape[1] >= 1 for b in blocks)
    assert max(b.shape[1] for b in blocks) > 1  # several tokens per round
    assert torch.equal(torch.cat([ids, *blocks], dim=1), out)
    prompt = tok.decode(ids[0].tolist())
    text = generate_text(target, tok, prompt, config, draft_model=drafts["self"])
    assert "".join(stream_text(target, tok, prompt, config, draft_model=drafts["self"])) == text
    assert text == generate_text(target, tok, prompt, config)


def test_statistics(target, drafts) -> None:
    stats = GenerationStats()
    config = GenerationConfig(max_new_tokens=24, temperature=0.0, eos_token_id=None, lookahead=4)
    blocks: list[torch.Tensor] = []
    generate(target, prompts(96, (5,))[0], config, draft_model=drafts["same"], stats=stats, streamer=blocks.append)
    extra = stats.extra
    assert stats.new_tokens == 24 and stats.prompt_tokens == 5
    # The first round (prefill and verification together) made 5 tokens in `prefill_seconds`: the decode rate is
    # the other 19 over the rest of the time, not 23 (a rate once counted the first round's extra tokens for free).
    assert stats.first_tokens == blocks[0].shape[1] == 5
    assert stats.tokens_per_second == pytest.approx((24 - 5) / stats.decode_seconds)
    assert extra["proposed"] == extra["accepted"] > 0 and extra["acceptance_rate"] == extra["alpha"] == 1.0
    assert extra["tokens_per_target_forward"] == 24 / extra["rounds"] == 24 / 5  # 5 + 5 + 5 + 5 + 4
    assert stats.target_forwards == extra["target_forwards"] == extra["rounds"] + 1  # + the prompt's prefill
    assert extra["draft_forwards"] >= extra["proposed"] - extra["rounds"]
    assert extra["target_seconds"] > 0 and extra["draft_seconds"] > 0 and extra["cost_ratio"] > 0
    _, spec = spec_generate(target, drafts["self"], prompts(96, (5,))[0], config)
    rejected = sum(n < k for k, n in zip(spec.lookaheads, spec.accepted_per_round, strict=True))
    assert spec.rejected == rejected > 0 and spec.alpha == spec.accepted / (spec.accepted + rejected)
    assert spec.alpha >= spec.acceptance_rate  # drafts after a rejection count in one, not in the other


def test_seed_makes_sampling_repeatable(target, drafts) -> None:
    config = GenerationConfig(max_new_tokens=20, temperature=1.0, top_k=10, seed=5, eos_token_id=None)
    ids = prompts(96, (4,))[0]
    a = spec_generate(target, drafts["unrelated"], ids, config)[0]
    assert torch.equal(a, spec_generate(target, drafts["unrelated"], ids, config)[0])


# -- schedules ----------------------------------------------------------------------------------------------------


def caps(spec: SpeculativeStats, max_new_tokens: int) -> list[int]:
    """Per round, the most drafts max_new_tokens allows: k drafts + 1 token must fit in what is left."""
    out, made = [], 0
    for n in spec.accepted_per_round:
        out.append(max_new_tokens - made - 1)
        made += n + 1
    return out


def test_constant_schedule_keeps_k(target, drafts) -> None:
    config = GenerationConfig(max_new_tokens=23, temperature=0.0, eos_token_id=None, lookahead=3)
    _, spec = spec_generate(target, drafts["unrelated"], prompts(96, (4,))[0], config)
    assert spec.lookaheads == [min(3, cap) for cap in caps(spec, 23)]


def test_heuristic_schedule_rule() -> None:
    s = HeuristicSchedule(GenerationConfig(lookahead=3, max_lookahead=8))
    seen = []
    for proposed, accepted in [(3, 3), (5, 5), (7, 7), (8, 8), (8, 2), (7, 0), (6, 6)]:
        s.update(proposed, accepted, [], None)
        seen.append(s.lookahead)
    assert seen == [5, 7, 8, 8, 7, 6, 8]
    for _ in range(10):
        s.update(1, 0, [], None)
    assert s.lookahead == 1


@pytest.mark.parametrize("kind, start", [("same", 1), ("unrelated", 6)])
def test_heuristic_schedule_in_a_run(target, drafts, kind: str, start: int) -> None:
    config = GenerationConfig(
        max_new_tokens=60,
        temperature=0.0,
        eos_token_id=None,
        lookahead=start,
        max_lookahead=6,
        lookahead_schedule="heuristic",
    )
    _, spec = spec_generate(target, drafts[kind], prompts(96, (2,))[0], config)
    K, expected = start, []
    for k, n in zip(spec.lookaheads, spec.accepted_per_round, strict=True):
        expected.append(K)
        K = min(6, K + 2) if n == k else max(1, K - 1)
    assert spec.lookaheads == [min(e, cap) for e, cap in zip(expected, caps(spec, 60), strict=True)]
    # All accepted: 1, 3, 5, 6, 6, ...; mostly rejected: 6, 5, 4, 3, 2, 1, ...
    assert spec.lookaheads[:4] == ([1, 3, 5, 6] if kind == "same" else [6, 5, 4, 3])


def test_threshold_schedule_rule() -> None:
    config = GenerationConfig(lookahead_schedule="threshold", max_lookahead=10, confidence_threshold=0.5)
    s = ThresholdSchedule(config)
    assert s.lookahead == 10
    s.start_round()
    assert s.keep_drafting(1, 0.1)  # the first draft is always proposed
    assert s.keep_drafting(2, 0.6) and not s.keep_drafting(3, 0.4)  # before c is known: the starting threshold
    # Teach it: confident drafts (m ~ 0.95) are accepted, unsure ones (m ~ 0.25) rejected; drafting is cheap.
    for _ in range(30):
        s.update(3, 2, [0.95, 0.95, 0.25], cost_ratio=0.1)
    curve = s.acceptance_curve()
    assert curve[9] > 0.9 and curve[2] < 0.3 and curve == sorted(curve)
    assert 0.2 < s.threshold <= 0.9  # the break-even acceptance c * R sits between the two
    s.start_round()
    assert s.keep_drafting(1, 0.95) and s.keep_drafting(2, 0.95) and not s.keep_drafting(3, 0.25)
    # A draft as expensive as the target is never worth a second token.
    s.update(1, 1, [0.95], cost_ratio=1.0)
    s.start_round()
    assert s.keep_drafting(1, 0.99) and not s.keep_drafting(2, 0.99)


@pytest.mark.parametrize("cost_ratio, verify_slope, expected", [(0.0, 0.0, 8), (1.0, 0.0, 1), (0.0, 1.0, 1)])
def test_threshold_schedule_in_a_run(target, cost_ratio: float, verify_slope: float, expected: int) -> None:
    config = GenerationConfig(
        max_new_tokens=40, temperature=0.0, eos_token_id=None, lookahead_schedule="threshold", max_lookahead=8
    )
    ids = prompts(96, (3,))[0]
    schedule = ThresholdSchedule(config, cost_ratio=cost_ratio, verify_slope=verify_slope)
    out, spec = spec_generate(target, target, ids, config, schedule=schedule)
    assert torch.equal(out, generate(target, ids, config))
    # Free drafts: always the maximum. Costly drafts, or drafts that each make the verification a whole target
    # forward dearer: one a round.
    assert set(spec.lookaheads[1:-1]) == {expected}


def test_verify_cost_curve() -> None:
    """v(k): the mean timed forward per k, non-decreasing, an untimed k priced optimistically at k - 1's cost."""
    cost = VerifyCost()
    assert cost.curve(3) == [1.0] * 4 and cost.marginal(3) == 0.0  # nothing timed: the paper's model
    for _ in range(50):  # a CPU-like curve, with a jump at 6 drafts (more rows than the kernel takes)
        cost.add(2, 1.0)
        cost.add(6, 3.0)
    assert cost.unit == pytest.approx(2.0)
    curve = cost.curve(8)
    assert curve == sorted(curve)
    assert curve[2] == pytest.approx(0.5) and curve[6] == pytest.approx(1.5, rel=0.03)
    assert curve[0] == curve[1] == curve[2]  # below the smallest k timed: flat
    assert curve[3] == curve[5] == curve[2]  # untimed k between: as cheap as the last timed one, so they get tried
    assert curve[7] == curve[8] == curve[6]
    assert cost.marginal(6) == pytest.approx(1.0, rel=0.05) and cost.marginal(4) == 0.0
    cost.add(4, 2.0)  # tried once: pulled toward k = 3's value by the prior, no longer free
    assert 0.5 < cost.curve(8)[4] < 1.0
    cost.add(3, 0.1)  # a fast outlier cannot make more rows cheaper than fewer
    assert cost.curve(8)[3] >= cost.curve(8)[2]
    assert VerifyCost(slope=0.25).curve(2) == [1.0, 1.25, 1.5]


def test_threshold_schedule_batch_rule() -> None:
    """In a batch, draft i is worth proposing when the live rows' summed survival beats (c + dv_i) * R * rows (R per
    row); a row with no room for draft i (NaN) brings nothing."""
    config = GenerationConfig(lookahead_schedule="threshold", max_lookahead=8)

    def second_draft(confidences: list[float]) -> bool:
        s = ThresholdSchedule(config, cost_ratio=0.3, verify_slope=0.0)  # R = 1 before any round: 0.3 a row
        s.start_round()
        assert s.keep_drafting_rows(1, [0.95] * len(confidences))  # a(0.95) = 0.95 (the prior)
        return s.keep_drafting_rows(2, confidences)  # survival 0.95 * a(m) per row; need 0.3 * rows

    assert not second_draft([0.15]) and not second_draft([0.15, 0.15])  # 0.1425 a row
    assert second_draft([0.95, 0.15])  # 0.9025 + 0.1425 >= 0.6: one sure row carries the batch
    assert second_draft([0.55, 0.55]) and not second_draft([0.55, math.nan])  # 1.045 >= 0.6 > 0.5225
    assert second_draft([0.95, math.nan])  # 0.9025: the row with room is sure enough for both
    # R is per row: four rows that each keep one draft of two make the rate one row keeping one makes.
    one, four = ThresholdSchedule(config, cost_ratio=0.1), ThresholdSchedule(config, cost_ratio=0.1)
    one.update_rows(2, 1, [1], [[0.9, 0.9]], cost_ratio=0.1)
    four.update_rows(2, 1, [1] * 4, [[0.9, 0.9]] * 4, cost_ratio=0.1)
    assert one.rate == pytest.approx(2 / 1.2) and four.rate == pytest.approx(one.rate)


def test_threshold_schedule_learns_from_every_row() -> None:
    config = GenerationConfig(lookahead_schedule="threshold", max_lookahead=8)
    s = ThresholdSchedule(config, cost_ratio=0.1, verify_slope=0.0)
    before = list(s.verified)
    # Row 0 kept 1 of its 3 usable drafts (draft 2 rejected, draft 3 never judged); row 1 could use only 1 and kept it.
    s.update_rows(3, 1, [1, 1], [[0.95, 0.55, 0.35], [0.75]], cost_ratio=0.1)
    judged = [b - a for a, b in zip(before, s.verified, strict=True)]
    assert judged[9] == 1 and judged[5] == 1 and judged[7] == 1 and judged[3] == 0 and sum(judged) == 3
    assert s.accepted[5] == pytest.approx(2 * 0.55)  # the rejected one added no acceptance to its bin
    assert s.tokens == 4  # every row's tokens: kept + 1 each


def test_threshold_schedule_times_its_draft_steps(monkeypatch) -> None:
    """Live timing: c is the time between two questions (a whole draft step) over the mean verification forward,
    and R's cost the rounds' measured times, all priced in the current mean verification forward."""
    import toyllm.speculative.schedules as schedules

    now = [0.0]
    monkeypatch.setattr(schedules.time, "perf_counter", lambda: now[0])

    def at(t: float) -> float:
        now[0] = t
        return t

    s = ThresholdSchedule(GenerationConfig(lookahead_schedule="threshold", max_lookahead=8))
    at(10.0), s.start_round()
    for t, index in ((10.0, 1), (12.0, 2), (14.0, 3)):  # draft steps of 2 s
        at(t), s.keep_drafting_rows(index, [0.99])
    s.update(3, 3, [0.99] * 3, cost_ratio=0.05, verify_seconds=10.0)  # the first round's cost is modelled
    assert s.cost_ratio == pytest.approx(0.2)  # 2 s per step / 10 s per verification, not the decoder's 0.05
    assert s.cost == pytest.approx(1.0 + 0.2 * 3)  # v(3) + 3c, in verification forwards (16 s)
    at(20.0), s.start_round()
    for t, index in ((20.0, 1), (21.0, 2)):  # a draft step of 1 s: c is now the mean of three steps, 5 s / 3
        at(t), s.keep_drafting_rows(index, [0.99])
    at(25.0), s.update(2, 2, [0.99] * 2, cost_ratio=0.05, verify_seconds=10.0)
    assert s.cost_ratio == pytest.approx(5 / 3 / 10)
    assert s.cost == pytest.approx(1.6 + 0.5)  # the round took 5 s, half a verification forward (10 s)
    at(30.0), s.start_round()
    at(30.0), s.keep_drafting_rows(1, [0.99])
    at(40.0), s.update(1, 1, [0.99], cost_ratio=0.05, verify_seconds=30.0)  # a slow verification: the unit moves
    unit = (10.0 + 10.0 + 30.0) / 3
    assert s.cost == pytest.approx((16.0 + 5.0 + 10.0) / unit)  # every round re-priced in today's unit
    assert s.rate == pytest.approx((4 + 3 + 2) / s.cost)


def test_bench_times_adaptive_schedules(tmp_path, monkeypatch) -> None:
    """`--schedules`: each schedule at each K, side by side; the formula's columns only where K is fixed."""
    from toyllm.bench.speculative import format_table, run_speculative_bench

    kw = dict(target="random:gpt2-tiny", cases=["self"], self_layers=1, lookaheads=[2, 4], max_new_tokens=12)
    import toyllm.bench.speculative as bench

    built: list[float | None] = []  # what each threshold schedule the bench built was told about v(k)

    class Recording(ThresholdSchedule):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            built.append(self.verify_cost.fixed_slope)

    monkeypatch.setattr(bench, "ThresholdSchedule", Recording)
    schedules = ["constant", "threshold", "threshold-flat"]  # -flat: the paper's v(k) = 1, an ablation
    results = run_speculative_bench(**kw, schedules=schedules, device="cpu", out_dir=tmp_path)
    assert built == [0.0, 0.0]  # one per -flat run (K = 2, 4); plain `threshold` learns v(k) (built by the decoder)
    rows = {(r["schedule"], r["lookahead"]): r for r in results["rows"]}
    assert sorted(rows) == [(s, k) for s in schedules for k in (2, 4)]
    assert all(r["outputs_match"] is True for r in rows.values())
    assert rows["constant", 4]["mean_lookahead"] <= 4 and rows["threshold", 4]["mean_lookahead"] <= 4
    assert math.isfinite(rows["constant", 2]["theoretical_speedup"])
    assert math.isnan(rows["threshold", 2]["theoretical_speedup"])  # the formula is for a fixed K
    assert "| self | threshold | 4 |" in format_table(results) and (tmp_path / "speculative_speedup.png").is_file()
    with pytest.raises(InvalidArgumentError, match="--schedules"):
        run_speculative_bench(**kw, schedules=["fastest"], device="cpu")


def test_bench_refuses_an_empty_run() -> None:
    """An empty list of cases or K would write a report with no rows over a good one; bad layer counts are one line."""
    from toyllm.bench.speculative import run_speculative_bench

    for bad in (dict(cases=[]), dict(lookaheads=[]), dict(lookaheads=[0, 2])):
        with pytest.raises(InvalidArgumentError, match="at least one value"):
            run_speculative_bench(target="random:gpt2-tiny", device="cpu", **bad)
    with pytest.raises(InvalidArgumentError, match="1..2 layers, got 0"):
        run_speculative_bench(target="random:gpt2-tiny", cases=["self"], self_layers=0, device="cpu")


def test_bench_flags_baselines_that_moved(monkeypatch) -> None:
    """Each case times the same target's plain decoding again; when those baselines disagree by more than 10%, the
    bench says so (an H100 run once had a 24% gap between two cases)."""
    import toyllm.bench.speculative as bench

    def plain(*steps: float) -> dict:
        return {f"case{i}": {"target": {"step_seconds": step}} for i, step in enumerate(steps)}

    assert bench.baseline_spread(plain(2.0, 1.6, 1.0)) == pytest.approx(2.0)
    assert bench.baseline_spread(plain(1.0)) == 1.0
    kw = dict(target="random:gpt2-tiny", lookaheads=[2], max_new_tokens=6, device="cpu")
    results = bench.run_speculative_bench(**kw, cases=["self", "same"], self_layers=1)  # the real spread, two cases
    assert results["settings"]["cases"] == ["self", "same"] == [r["case"] for r in results["rows"]]  # order kept
    steps = [runs["target"]["step_seconds"] for runs in results["plain"].values()]
    assert len(steps) == 2 and results["plain_spread"] == pytest.approx(max(steps) / min(steps))
    kw["cases"] = ["same"]
    for spread, warned in [(1.05, False), (1.24, True)]:
        messages: list[str] = []
        monkeypatch.setattr(bench, "baseline_spread", lambda runs, spread=spread: spread)
        results = bench.run_speculative_bench(**kw, progress=messages.append)
        assert results["plain_spread"] == spread
        assert any(m.startswith("warning: plain decoding") for m in messages) is warned


# -- errors -------------------------------------------------------------------------------------------------------


def test_errors(target) -> None:
    ids = prompts(96, (3,))[0]
    config = GenerationConfig(max_new_tokens=4)
    with pytest.raises(InvalidArgumentError, match="vocabulary"):
        list(speculative_stream(target, tiny(1, vocab=50), ids, config))
    with pytest.raises(InvalidArgumentError, match="needs at least 2"):  # a 1-token window cannot take a catch-up
        list(speculative_stream(target, tiny(1, n_positions=1), ids, config))
    one_back = GenerationConfig(max_new_tokens=20, temperature=0.0, eos_token_id=None, lookahead=4)
    assert torch.equal(spec_generate(target, tiny(1, n_positions=2), ids, one_back)[0], generate(target, ids, one_back))
    with pytest.raises(InvalidArgumentError, match="batch size 1"):
        list(speculative_stream(target, target, ids.repeat(2, 1), config))
    with pytest.raises(InvalidArgumentError, match="context window"):
        long = torch.zeros(1, 70, dtype=torch.long)
        list(speculative_stream(target, target, long, GenerationConfig(max_new_tokens=4, sliding_window=False)))


# -- the seed project's script ------------------------------------------------------------------------------------


def test_seed_script_offline(capsys) -> None:
    from toyllm.cli.run_speculative_sampling import hub_name, main

    assert hub_name("gpt2-small") == "gpt2" and hub_name("random:gpt2-small") == "random:gpt2-small"
    argv = ["--target_model", "random:gpt2-tiny", "--draft_model", "random:gpt2-tiny", "--lookahead", "3"]
    assert main([*argv, "--max_new_tokens", "6", "--seed", "0", "--temperature", "0", "--prompt", "Hello"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("Hello")
    assert "acceptance_rate" in captured.err and "tokens_per_target_forward" in captured.err
    assert main([*argv, "--lookahead", "0"]) == 2  # a bad value is one line on stderr, exit code 2
    assert "lookahead" in capsys.readouterr().err
    for bound in ("2", "-5"):  # an explicit bound below K is an error, not quietly raised to K
        assert main([*argv, "--max_lookahead", bound]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"1..max_lookahead ({bound})" in err
