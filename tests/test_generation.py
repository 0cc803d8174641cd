"""The cached engine against the plain recompute-everything path, and the generation semantics."""

from __future__ import annotations

import pytest
import torch

from toyllm.errors import InvalidArgumentError
from toyllm.generation import (
    GenerationConfig,
    GenerationStats,
    encode_prompts,
    generate,
    generate_text,
    prefill,
    stream_text,
)
from toyllm.gpt2 import GPT2Config, GPT2LMHeadModel
from toyllm.gpt2.model import attention_dtype, build_attention_mask
from toyllm.kv_cache import KVCache

VOCAB = 300


def tiny_model(n_positions: int = 256, seed: int = 0, **kw: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    # The GPT-2 init (std 0.02) gives nearly uniform logits that greedy decoding turns into one repeated token;
    # a larger init makes the model's choices depend on the whole context, which is what these tests need.
    cfg = GPT2Config(
        vocab_size=VOCAB, n_positions=n_positions, n_embd=48, n_layer=3, n_head=4, initializer_range=0.3, **kw
    )
    return GPT2LMHeadModel(cfg).eval()


class ByteTokenizer:
    """Bytes as tokens (0..255) plus an EOS (256): random models emit invalid UTF-8 often, a hard case."""

    eos_token_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode_bytes(self, ids: list[int]) -> bytes:
        return bytes(i for i in ids if i < 256)

    def decode(self, ids: list[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


def prompts(n: int, length: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (1, length + i), generator=g) for i in range(n)]


def greedy(**kw: object) -> GenerationConfig:
    return GenerationConfig(temperature=0.0, eos_token_id=None, **kw)  # type: ignore[arg-type]


# -- KV cache == plain path ------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", prompts(3, 5))
def test_kv_cache_greedy_equals_plain_over_200_steps(prompt: torch.Tensor) -> None:
    model = tiny_model()
    cached = generate(model, prompt, greedy(max_new_tokens=200))
    plain = generate(model, prompt, greedy(max_new_tokens=200, use_kv_cache=False))
    assert cached.shape == (1, prompt.shape[1] + 200)
    assert torch.equal(cached, plain)
    assert len(set(cached[0, -200:].tolist())) > 10  # the test would be weak if the model repeated one token


def test_kv_cache_step_logits_match_full_forward() -> None:
    model = tiny_model()
    ids = torch.randint(0, VOCAB, (2, 60), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids)  # (B, T, V) in one pass, no cache
        cache = KVCache.for_model(model, batch_size=2)
        steps = [model(ids[:, :10], cache=cache)]
        for t in range(10, 60):
            steps.append(model(ids[:, t : t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=0)


@pytest.mark.parametrize("chunk", [1, 7, 64, 100])
def test_chunked_prefill_equals_one_shot(chunk: int) -> None:
    model = tiny_model()
    ids = torch.randint(0, VOCAB, (2, 100), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        one_cache, chunk_cache = KVCache.for_model(model, 2), KVCache.for_model(model, 2)
        one = prefill(model, one_cache, ids)
        chunked = prefill(model, chunk_cache, ids, chunk_size=chunk)
    torch.testing.assert_close(chunked, one, atol=1e-4, rtol=0)
    assert chunk_cache.length == one_cache.length == 100
    for layer in range(model.config.n_layer):
        torch.testing.assert_close(chunk_cache.k[layer][:, :, :100], one_cache.k[layer][:, :, :100], atol=1e-4, rtol=0)
        torch.testing.assert_close(chunk_cache.v[layer][:, :, :100], one_cache.v[layer][:, :, :100], atol=1e-4, rtol=0)
    out_one = generate(model, ids[:1], greedy(max_new_tokens=20))
    out_chunk = generate(model, ids[:1], greedy(max_new_tokens=20, chunk_size=chunk))
    assert torch.equal(out_one, out_chunk)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("padded", [False, True])
def test_attention_mask_is_additive_bottom_right_in_the_queries_dtype(dtype: torch.dtype, padded: bool) -> None:
    """The mask SDPA gets over a cache: 0 where query i (at position past + i) may see key j, -inf elsewhere, in the
    queries' dtype (a bool mask would be converted again in every layer). Checked against a loop over (i, j)."""
    T, past = 3, 4
    key_padding = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]]) if padded else None
    mask, is_causal = build_attention_mask(T, past, key_padding, torch.device("cpu"), dtype)
    assert mask is not None and mask.dtype == dtype and not is_causal
    for b in range(2 if padded else 1):
        for i in range(T):
            for j in range(past + T):
                sees = j <= past + i and (key_padding is None or bool(key_padding[b, j]))
                value = mask[b, 0, i, j] if padded else mask[i, j]
                assert float(value) == (0.0 if sees else float("-inf")), (b, i, j)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the linears return bf16 queries, so the mask follows
        assert attention_dtype(torch.zeros(1)) == torch.bfloat16
        assert attention_dtype(torch.zeros(1, dtype=torch.float64)) == torch.float64  # autocast skips float64
        model = tiny_model().double()
        ids = torch.randint(0, VOCAB, (1, 8))
        cache = KVCache.for_model(model, 1)
        model(ids[:, :5], cache=cache)
        assert model(ids[:, 5:], cache=cache).dtype == torch.float64  # 3 tokens over a cache: a mask, in float64
    assert attention_dtype(torch.zeros(1, dtype=torch.float16)) == torch.float16


@pytest.mark.parametrize("use_kv_cache", [True, False])
@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_batched_left_padding_equals_one_by_one(use_kv_cache: bool, penalty: float) -> None:
    model = tiny_model()
    rows = [p[0] for p in prompts(1, 3, seed=5) + prompts(1, 11, seed=6) + prompts(1, 7, seed=7)]
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r) :], mask[i, T - len(r) :] = r, 1
    config = greedy(max_new_tokens=30, use_kv_cache=use_kv_cache, repetition_penalty=penalty)
    batched = generate(model, ids, config, attention_mask=mask)
    for i, r in enumerate(rows):
        alone = generate(model, r[None], config)
        assert torch.equal(batched[i, T:], alone[0, len(r) :]), f"row {i} differs"


@pytest.mark.parametrize("keep", [4, 12])
def test_left_padding_survives_window_slides(keep: int) -> None:
    """A padded batch past the window: the cache decides once per window whether padding is still in it (keep 12:
    after the first slide the window still holds some; keep 4: none). The recompute-everything path is the
    reference."""
    model = tiny_model(n_positions=16)
    rows = [p[0] for p in prompts(1, 3, seed=5) + prompts(1, 11, seed=6) + prompts(1, 7, seed=7)]
    ids = torch.zeros(3, 11, dtype=torch.long)
    mask = torch.zeros(3, 11, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, 11 - len(r) :], mask[i, 11 - len(r) :] = r, 1
    config = greedy(max_new_tokens=40, window_keep=keep)
    cached = generate(model, ids, config, attention_mask=mask)
    plain = generate(model, ids, greedy(max_new_tokens=40, window_keep=keep, use_kv_cache=False), attention_mask=mask)
    assert torch.equal(cached, plain)


# -- past the context window -----------------------------------------------------------------------------------


def naive_window_reference(
    model: GPT2LMHeadModel, prompt: list[int], new: int, keep: int, penalty: float = 1.0
) -> list[int]:
    """The documented rule, written as plainly as possible: predict from tokens[s:t], and whenever the context
    would exceed n_positions, restart it from the last `keep` tokens."""
    W = model.config.n_positions
    tokens, s = list(prompt), 0
    if len(tokens) > W:
        s = len(tokens) - keep
    for _ in range(new):
        if len(tokens) - s > W:
            s = len(tokens) - keep
        with torch.no_grad():
            logits = model(torch.tensor([tokens[s:]]))[0, -1]
        seen = set(tokens)
        for tok in seen:  # repetition penalty over the whole sequence, HF formula
            logits[tok] = logits[tok] * penalty if logits[tok] < 0 else logits[tok] / penalty
        tokens.append(int(logits.argmax()))
    return tokens


@pytest.mark.parametrize("keep", [None, 5, 31])
@pytest.mark.parametrize("prompt_len", [4, 40])
def test_sliding_window_matches_naive_reference(keep: int | None, prompt_len: int) -> None:
    model = tiny_model(n_positions=32)
    prompt = prompts(1, prompt_len, seed=8)[0]
    cfg = greedy(max_new_tokens=100, window_keep=keep, repetition_penalty=1.1)
    expected = naive_window_reference(model, prompt[0].tolist(), 100, keep or 16, penalty=1.1)
    for use_kv_cache in (True, False):
        cfg.use_kv_cache = use_kv_cache
        assert generate(model, prompt, cfg)[0].tolist() == expected


def test_generates_4096_tokens_past_the_window() -> None:
    model = tiny_model(n_positions=64)
    out = generate(model, prompts(1, 5)[0], greedy(max_new_tokens=4096, chunk_size=16))
    assert out.shape == (1, 5 + 4096)


def test_no_window_rejects_long_prompt_and_stops_at_the_edge() -> None:
    model = tiny_model(n_positions=32)
    with pytest.raises(InvalidArgumentError, match="context window"):
        generate(model, prompts(1, 33)[0], greedy(max_new_tokens=5, sliding_window=False))
    out = generate(model, prompts(1, 20)[0], greedy(max_new_tokens=50, sliding_window=False))
    assert out.shape[1] == 33  # 32 tokens fit the context, so the last forward can still add one


# -- sampling, seeds, stopping -----------------------------------------------------------------------------------


def test_seed_makes_sampling_reproducible_and_matches_plain_path() -> None:
    model = tiny_model()
    prompt = prompts(1, 6)[0]
    cfg = GenerationConfig(max_new_tokens=40, seed=123, top_k=20, top_p=0.9, temperature=0.9, eos_token_id=None)
    a, b = generate(model, prompt, cfg), generate(model, prompt, cfg)
    cfg.use_kv_cache = False
    c = generate(model, prompt, cfg)
    cfg.seed = 124
    d = generate(model, prompt, cfg)
    assert torch.equal(a, b) and torch.equal(a, c) and not torch.equal(a, d)


def test_eos_stops_rows_and_pads_finished_ones() -> None:
    model = tiny_model()
    prompt = prompts(1, 6)[0]
    free = generate(model, prompt, greedy(max_new_tokens=30))[0, 6:].tolist()
    eos = free[9]  # pretend the 10th generated token is EOS
    first = free.index(eos)
    out = generate(model, prompt, GenerationConfig(temperature=0.0, max_new_tokens=30, eos_token_id=eos))
    assert out[0, 6:].tolist() == free[: first + 1]
    two = torch.cat([prompt, prompts(1, 6, seed=9)[0]])
    both = generate(model, two, GenerationConfig(temperature=0.0, max_new_tokens=30, eos_token_id=eos))
    row0 = both[0, 6:].tolist()
    assert row0[: first + 1] == free[: first + 1] and set(row0[first + 1 :]) <= {eos}


def test_stop_strings_end_generation() -> None:
    model, tok = tiny_model(), ByteTokenizer()
    prompt = torch.tensor([tok.encode("abc")])
    free = generate(model, prompt, greedy(max_new_tokens=40))[0, 3:].tolist()
    # The first two-byte window after position 10 that is valid text, and appears nowhere earlier.
    at = next(
        i
        for i in range(10, 38)
        if "\ufffd" not in (s := tok.decode(free[i : i + 2])) and s not in tok.decode(free[: i + 1])
    )
    stop = tok.decode(free[at : at + 2])
    out = generate(model, prompt, greedy(max_new_tokens=40, stop=[stop]), tokenizer=tok)
    assert out[0, 3:].tolist() == free[: at + 2]  # stops right after the token that completes the stop string


def test_stop_strings_need_a_tokenizer() -> None:
    with pytest.raises(InvalidArgumentError, match="tokenizer"):
        generate(tiny_model(), prompts(1, 3)[0], greedy(max_new_tokens=3, stop=["x"]))


@pytest.mark.parametrize("seed", range(5))
def test_streaming_concatenates_to_the_final_text(seed: int) -> None:
    model, tok = tiny_model(seed=seed), ByteTokenizer()
    cfg = GenerationConfig(max_new_tokens=60, seed=seed, eos_token_id=256, temperature=1.0, top_k=0)
    pieces = list(stream_text(model, tok, "héllo ✓", cfg))
    assert "".join(pieces) == generate_text(model, tok, "héllo ✓", cfg)
    assert all(pieces)


def test_streaming_holds_back_and_cuts_at_stop_string() -> None:
    model, tok = tiny_model(), ByteTokenizer()
    base = GenerationConfig(max_new_tokens=40, temperature=0.0, eos_token_id=None)
    full = generate_text(model, tok, "abc", base)
    assert isinstance(full, str)
    stop = full[10:13]
    cfg = GenerationConfig(max_new_tokens=40, temperature=0.0, eos_token_id=None, stop=[stop])
    streamed = "".join(stream_text(model, tok, "abc", cfg))
    assert streamed == generate_text(model, tok, "abc", cfg) == full[: full.index(stop)]


def test_generate_text_batch_equals_single() -> None:
    model, tok = tiny_model(), ByteTokenizer()
    cfg = GenerationConfig(max_new_tokens=15, temperature=0.0, eos_token_id=None)
    batch = generate_text(model, tok, ["a", "hello there", "xyz"], cfg)
    assert batch == [generate_text(model, tok, p, cfg) for p in ["a", "hello there", "xyz"]]


def test_stats_are_filled() -> None:
    stats = GenerationStats()
    generate(tiny_model(), prompts(1, 8)[0], greedy(max_new_tokens=12), stats=stats)
    assert stats.prompt_tokens == 8 and stats.new_tokens == 12 and stats.target_forwards == 12
    assert stats.prefill_seconds > 0 and stats.decode_seconds > 0


@pytest.mark.parametrize("draft", [False, True])
def test_stats_are_filled_when_a_stream_stops_early(draft: bool) -> None:
    """A stream that ends at EOS stops reading the token generator before it finishes; the decode time must still be
    there (it was 0, and the CLI printed "every token came with the prefill")."""
    model, tok = tiny_model(), ByteTokenizer()
    free = generate(model, torch.tensor([tok.encode("Hi")]), greedy(max_new_tokens=30))[0, 2:].tolist()
    config = GenerationConfig(temperature=0.0, max_new_tokens=30, eos_token_id=free[20])  # the 21st token ends it
    stats = GenerationStats()
    text = "".join(stream_text(model, tok, "Hi", config, draft_model=model if draft else None, stats=stats))
    assert text == generate_text(model, tok, "Hi", config)
    assert stats.new_tokens > stats.first_tokens and stats.decode_seconds > 0
    assert stats.tokens_per_second > 0


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(max_new_tokens=0),
        dict(max_new_tokens=10**20),
        dict(temperature=-1.0),
        dict(top_p=0.0),
        dict(top_k=-2),
        dict(repetition_penalty=0.0),
    ],
)
def test_invalid_config_is_rejected(kwargs: dict[str, float]) -> None:
    with pytest.raises(InvalidArgumentError):
        generate(tiny_model(), prompts(1, 3)[0], GenerationConfig(**kwargs))  # type: ignore[arg-type]


def test_token_ids_outside_the_vocabulary_are_one_error() -> None:
    """A tokenizer (or data) of another model gives ids the embedding cannot look up: a clear error, not IndexError."""
    model = tiny_model()
    vocab = model.config.vocab_size
    for bad, draft in [(vocab, None), (-1, None), (vocab + 5, model)]:  # plain, and speculative decoding
        ids = torch.tensor([[1, bad, 2]])
        with pytest.raises(InvalidArgumentError, match=f"token id {bad}, outside the model's vocabulary of {vocab}"):
            generate(model, ids, GenerationConfig(max_new_tokens=2), draft_model=draft)


def test_empty_prompt_is_rejected() -> None:
    with pytest.raises(InvalidArgumentError, match="empty"):
        encode_prompts(ByteTokenizer(), [""], 0)
