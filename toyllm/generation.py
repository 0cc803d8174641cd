"""Autoregressive generation: prefill (optionally chunked), then one token per step from the KV cache.

The loop in `stream_tokens` is the whole engine. Everything else (`generate`, `generate_text`, `stream_text`, the
CLI, the benchmarks) is a thin layer over it, and speculative decoding plugs in as another token source.

Semantics past the context window (GPT-2 has learned positions, so it cannot see more than `n_positions` tokens):
the model predicts each token from `tokens[s:t]`, where `s` starts at 0 and jumps to `t - window_keep` whenever
`t - s` would exceed `n_positions`. At that moment the cache is rebuilt from the kept tokens (one prefill), and
decoding continues one token at a time. `use_kv_cache=False` recomputes `tokens[s:t]` from scratch at every step
with the same rule, which is the readable reference the cached path is tested against.
"""

from __future__ import annotations

import codecs
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from toyllm.errors import InvalidArgumentError
from toyllm.gpt2.model import GPT2LMHeadModel
from toyllm.kv_cache import KVCache
from toyllm.sampling import process_logits, sample, validate_sampling, validate_seed

LOOKAHEAD_SCHEDULES = ("constant", "heuristic", "threshold")
# A bound on one call's new tokens: generation preallocates (rows, prompt + max_new_tokens) token ids, so a huge value
# would fail in the allocator (or overflow it) instead of saying what is wrong. 10 million tokens is ~80 MB per row.
MAX_NEW_TOKENS = 10_000_000


@dataclass
class GenerationConfig:
    """What to generate and how. Field names and defaults follow Hugging Face where they overlap.

    temperature=0 means greedy. top_k=0 and top_p=1 disable those filters; repetition_penalty=1 disables it.
    """

    max_new_tokens: int = 100
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    eos_token_id: int | None = 50256  # None: never stop on EOS
    pad_token_id: int | None = None  # what finished rows emit; defaults to eos_token_id
    stop: Sequence[str] = ()  # stop strings (need a tokenizer)
    use_kv_cache: bool = True
    chunk_size: int | None = None  # prefill in chunks of this many tokens; None means one shot
    sliding_window: bool = True  # allow generating past the context window
    window_keep: int | None = None  # tokens kept when the window slides; None means n_positions // 2
    # Speculative decoding (used when a draft model is given).
    lookahead: int = 4
    lookahead_schedule: str = "constant"
    max_lookahead: int = 16
    confidence_threshold: float = 0.4  # starting draft-confidence threshold of the `threshold` schedule

    def validate(self) -> None:
        validate_sampling(self.temperature, self.top_k, self.top_p, self.repetition_penalty)
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise InvalidArgumentError(
                f"max_new_tokens must be in 1..{MAX_NEW_TOKENS:,} (the token buffer is allocated up front), "
                f"got {self.max_new_tokens}"
            )
        validate_seed(self.seed)
        if self.chunk_size is not None and self.chunk_size < 1:
            raise InvalidArgumentError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.window_keep is not None and self.window_keep < 1:
            raise InvalidArgumentError(f"window_keep must be >= 1, got {self.window_keep}")
        if self.lookahead < 1:  # (max_lookahead is no CLI option of `toyllm generate`: no need to name it here)
            raise InvalidArgumentError(f"lookahead must be >= 1, got {self.lookahead}")
        if self.max_lookahead < self.lookahead:
            raise InvalidArgumentError(
                f"lookahead must be in 1..max_lookahead ({self.max_lookahead}), got {self.lookahead}"
            )
        if self.lookahead_schedule not in LOOKAHEAD_SCHEDULES:
            raise InvalidArgumentError(
                f"lookahead_schedule must be one of {', '.join(LOOKAHEAD_SCHEDULES)}, got '{self.lookahead_schedule}'"
            )
        if not 0 <= self.confidence_threshold < 1:
            raise InvalidArgumentError(f"confidence_threshold must be in [0, 1), got {self.confidence_threshold}")
        if any(not s for s in self.stop):
            raise InvalidArgumentError("stop strings must not be empty")


@dataclass
class GenerationStats:
    """Filled in by `generate` when passed in: where the time went and how many forwards ran."""

    prompt_tokens: int = 0
    new_tokens: int = 0  # per row
    prefill_seconds: float = 0.0  # time to the first token, prefill included
    decode_seconds: float = 0.0
    target_forwards: int = 0
    # Tokens (per row) that came out with the prefill, in `prefill_seconds`: 1 for plain decoding, the whole first
    # round's output for speculative decoding (its first round prefills the prompt and verifies drafts too).
    first_tokens: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        """Decode speed: the tokens that came with the prefill are counted in its time, so they are left out here."""
        tokens = self.new_tokens - self.first_tokens
        return tokens / self.decode_seconds if self.decode_seconds > 0 and tokens > 0 else float("nan")


def _positions(valid: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding: the first real token of every row gets position 0."""
    return (valid.long().cumsum(-1) - 1).clamp(min=0)  # (B, L)


def prefill(
    model: GPT2LMHeadModel,
    cache: KVCache | None,
    ids: torch.Tensor,
    valid: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Run the prompt through the model, filling `cache`, and return the last position's logits (B, V).

    With `chunk_size`, the prompt goes in pieces: each piece attends to the cache plus itself (a bottom-right
    causal mask), so the result equals a one-shot prefill while the attention scores and MLP activations only
    ever exist for `chunk_size` rows at a time.
    """
    B, L = ids.shape
    padded = valid is not None and not bool(valid.all())
    pos = _positions(valid) if padded and valid is not None else None
    step = chunk_size if (chunk_size and cache is not None) else L
    logits = None
    for start in range(0, L, step):
        end = min(L, start + step)
        logits = model(
            ids[:, start:end],
            cache=cache,
            position_ids=pos[:, start:end] if pos is not None else None,
            attention_mask=valid[:, :end] if padded and valid is not None else None,
            logits_to_keep=1,
        )
    if logits is None:
        raise InvalidArgumentError("prefill needs at least one token")
    return logits[:, -1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _StopChecker:
    """Marks rows finished on EOS or when their generated text contains a stop string."""

    def __init__(self, config: GenerationConfig, tokenizer: Any | None, batch: int, device: torch.device) -> None:
        if config.stop and tokenizer is None:
            raise InvalidArgumentError("stop strings need a tokenizer: pass tokenizer= to generate()")
        self.eos = config.eos_token_id
        self.stop = list(config.stop)
        self.tokenizer = tokenizer
        # A stop string of n characters spans at most 4n tokens (a character is at most 4 UTF-8 bytes).
        self.tail = 4 * max((len(s) for s in self.stop), default=0) + 1
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)

    def update(self, new: torch.Tensor, generated: torch.Tensor) -> None:
        """new: (B, n) tokens just emitted; generated: (B, G) every token generated so far."""
        if self.eos is not None:
            self.finished |= (new == self.eos).any(dim=-1)
        if self.stop:
            for row in range(generated.shape[0]):
                if not self.finished[row] and self._stop_string_in(generated[row, -self.tail - new.shape[1] :]):
                    self.finished[row] = True

    def stops_at(self, token: int, row: torch.Tensor, start: int, end: int) -> bool:
        """Whether a row that has just emitted `token` (a host int) ends there; `row[start:end]` (1-D) is everything it
        generated, `token` last. The speculative decoders' test, token by token, as their rounds emit different numbers
        of tokens per row. The EOS test reads the int: no tensor is touched (not even sliced: a slice per token was a
        visible share of a small model's round) and no device sync, unless stop strings need the text."""
        return token == self.eos or bool(self.stop) and self._stop_string_in(row[max(start, end - self.tail - 1) : end])

    def _stop_string_in(self, tail: torch.Tensor) -> bool:
        assert self.tokenizer is not None
        text = self.tokenizer.decode(tail.tolist())
        return any(s in text for s in self.stop)


def stream_tokens(
    model: GPT2LMHeadModel,
    input_ids: torch.Tensor,
    config: GenerationConfig,
    *,
    attention_mask: torch.Tensor | None = None,
    tokenizer: Any | None = None,
    stats: GenerationStats | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the new tokens of every row, (B, 1) per step, as soon as each is sampled.

    Rows that have finished (EOS or a stop string) keep emitting `pad_token_id` until every row is done.
    `attention_mask` (B, T) marks left padding with 0, for batches of prompts of different lengths.
    """
    config.validate()
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise InvalidArgumentError("input_ids must have shape (batch, prompt_length) with a non-empty prompt")
    cfg = model.config
    device = input_ids.device
    B, T0 = input_ids.shape
    W = cfg.n_positions
    keep = config.window_keep if config.window_keep is not None else W // 2
    if keep >= W:
        raise InvalidArgumentError(f"window_keep ({keep}) must be smaller than the context window ({W})")
    if T0 > W and not config.sliding_window:
        raise InvalidArgumentError(
            f"the prompt has {T0} tokens but the model's context window is {W}; shorten it or allow the window"
        )
    pad = config.pad_token_id if config.pad_token_id is not None else (config.eos_token_id or 0)
    generator = None
    if config.seed is not None:
        generator = torch.Generator(device=device).manual_seed(config.seed)

    total = T0 + config.max_new_tokens
    tokens = torch.full((B, total), pad, dtype=torch.long, device=device)  # preallocated: no growth by cat
    tokens[:, :T0] = input_ids
    valid = torch.ones(B, total, dtype=torch.bool, device=device)
    if attention_mask is not None:
        valid[:, :T0] = attention_mask.bool()
    stopper = _StopChecker(config, tokenizer, B, device)
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = T0

    t, s = T0, max(0, T0 - keep) if T0 > W else 0
    cache = KVCache.for_model(model, B, max_len=min(W, total - s)) if config.use_kv_cache else None

    def has_padding() -> bool:
        """Whether tokens[s:] hold left padding. Only the prompt can, so this changes only when s moves: asked once
        per window, not per step (reading a device tensor is a sync on a GPU, and a step already needs one)."""
        return s < T0 and not bool(valid[:, s:T0].all())

    padded = has_padding()

    def context_logits() -> torch.Tensor:
        """Logits for the next token from scratch over tokens[s:t] (a fresh prefill)."""
        if cache is not None:
            cache.reset()
        stats.target_forwards += 1
        return prefill(model, cache, tokens[:, s:t], valid[:, s:t], config.chunk_size)

    start = time.perf_counter()
    with torch.inference_mode():
        logits = context_logits()
        for step in range(config.max_new_tokens):
            processed = process_logits(
                logits,
                tokens[:, :t],
                temperature=config.temperature,
                top_k=config.top_k,
                top_p=config.top_p,
                repetition_penalty=config.repetition_penalty,
                valid=valid[:, :t],
            )
            nxt = sample(processed, config.temperature, generator)  # (B,)
            nxt = torch.where(stopper.finished, torch.full_like(nxt, pad), nxt)
            tokens[:, t] = nxt
            t += 1
            stopper.update(nxt[:, None], tokens[:, T0:t])
            if step == 0:
                _sync(device)
                stats.prefill_seconds = time.perf_counter() - start
                start = time.perf_counter()
            stats.new_tokens = step + 1
            if step:  # kept current: a caller may stop reading at any token (a stop string, EOS in a stream)
                stats.decode_seconds = time.perf_counter() - start
            yield nxt[:, None]
            if bool(stopper.finished.all()) or step == config.max_new_tokens - 1:
                break
            if t - s > W:  # the context is full: slide the window and rebuild the cache
                if not config.sliding_window:
                    break
                s = t - keep
                padded = has_padding()
                logits = context_logits()
            elif cache is not None:
                stats.target_forwards += 1
                logits = model(
                    nxt[:, None],
                    cache=cache,
                    position_ids=_positions(valid[:, s:t])[:, -1:] if padded else None,
                    attention_mask=valid[:, s:t] if padded else None,
                    logits_to_keep=1,
                )[:, -1]
            else:
                logits = context_logits()
        _sync(device)
    stats.decode_seconds = time.perf_counter() - start


def token_source(
    model: GPT2LMHeadModel,
    input_ids: torch.Tensor,
    config: GenerationConfig,
    *,
    attention_mask: torch.Tensor | None = None,
    tokenizer: Any | None = None,
    draft_model: GPT2LMHeadModel | None = None,
    stats: GenerationStats | None = None,
) -> Iterator[torch.Tensor]:
    """Plain decoding, or speculative decoding when a draft model is given. Yields (B, n) tokens per step."""
    check_token_ids(input_ids, model, "prompt")  # padding too: the model embeds every position
    if draft_model is None:
        return stream_tokens(model, input_ids, config, attention_mask=attention_mask, tokenizer=tokenizer, stats=stats)
    from toyllm.speculative import batch_speculative_stream, speculative_stream

    padded = attention_mask is not None and not bool(attention_mask.all())
    if input_ids.ndim == 2 and (input_ids.shape[0] > 1 or padded):  # a batch: every row accepts its own drafts
        return batch_speculative_stream(
            model, draft_model, input_ids, config, attention_mask=attention_mask, tokenizer=tokenizer, stats=stats
        )
    return speculative_stream(model, draft_model, input_ids, config, tokenizer=tokenizer, stats=stats)


def check_token_ids(ids: torch.Tensor, model: GPT2LMHeadModel, what: str) -> None:
    """Token ids outside the model's vocabulary (a tokenizer or data that belongs to another model) would stop
    the embedding lookup with an IndexError; say what is wrong instead."""
    vocab = model.config.vocab_size
    if not ids.numel():
        return
    low, high = int(ids.min()), int(ids.max())  # (each is a device sync on a GPU: read once)
    if low < 0 or high >= vocab:
        bad = high if high >= vocab else low
        raise InvalidArgumentError(
            f"the {what} holds token id {bad}, outside the model's vocabulary of {vocab} tokens: "
            "does the tokenizer (or the data) belong to this model?"
        )


def generate(
    model: GPT2LMHeadModel,
    input_ids: torch.Tensor,
    config: GenerationConfig | None = None,
    *,
    attention_mask: torch.Tensor | None = None,
    tokenizer: Any | None = None,
    draft_model: GPT2LMHeadModel | None = None,
    streamer: Callable[[torch.Tensor], None] | None = None,
    stats: GenerationStats | None = None,
) -> torch.Tensor:
    """Generate and return the prompt followed by the new tokens, (B, T + new).

    `streamer` is called with every new (B, n) block of tokens as it is produced.
    """
    config = config if config is not None else GenerationConfig()
    pieces = [input_ids]
    for new in token_source(
        model,
        input_ids,
        config,
        attention_mask=attention_mask,
        tokenizer=tokenizer,
        draft_model=draft_model,
        stats=stats,
    ):
        pieces.append(new)
        if streamer is not None:
            streamer(new)
    return torch.cat(pieces, dim=1)


# -- text level -------------------------------------------------------------------------------------------------


def encode_prompts(
    tokenizer: Any, prompts: Sequence[str], pad_token_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad a batch of prompts: (ids, attention_mask), both (B, T_max). Left, so every row ends at column T."""
    encoded = [tokenizer.encode(p) for p in prompts]
    if any(len(e) == 0 for e in encoded):
        raise InvalidArgumentError("the prompt is empty: give at least one character of text")
    T = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), T), pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(encoded), T, dtype=torch.long)
    for row, e in enumerate(encoded):
        ids[row, T - len(e) :] = torch.tensor(e)
        mask[row, T - len(e) :] = 1
    return ids.to(device), mask.to(device)


def _cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    cuts = [text.find(s) for s in stop if s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


def _model_device(model: GPT2LMHeadModel) -> torch.device:
    return next(model.parameters()).device


def generate_text(
    model: GPT2LMHeadModel,
    tokenizer: Any,
    prompt: str | Sequence[str],
    config: GenerationConfig | None = None,
    *,
    draft_model: GPT2LMHeadModel | None = None,
    stats: GenerationStats | None = None,
) -> str | list[str]:
    """Complete one prompt (returns str) or a batch of prompts (returns list[str]).

    The returned text is the completion only, ending before the EOS token and before any stop string (the token
    ids from `generate` still contain them).
    """
    config = config if config is not None else GenerationConfig()
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    pad = config.pad_token_id if config.pad_token_id is not None else tokenizer.eos_token_id
    ids, mask = encode_prompts(tokenizer, prompts, pad, _model_device(model))
    out = generate(
        model,
        ids,
        config,
        attention_mask=mask if len(prompts) > 1 else None,
        tokenizer=tokenizer,
        draft_model=draft_model,
        stats=stats,
    )
    texts = []
    for row in out[:, ids.shape[1] :].tolist():
        if config.eos_token_id is not None and config.eos_token_id in row:
            row = row[: row.index(config.eos_token_id)]
        texts.append(_cut_at_stop(tokenizer.decode(row), config.stop)[0])
    return texts[0] if isinstance(prompt, str) else texts


def stream_text(
    model: GPT2LMHeadModel,
    tokenizer: Any,
    prompt: str,
    config: GenerationConfig | None = None,
    *,
    draft_model: GPT2LMHeadModel | None = None,
    stats: GenerationStats | None = None,
) -> Iterator[str]:
    """Yield the completion of one prompt as text pieces, as they are produced.

    Tokens are decoded to bytes and fed through an incremental UTF-8 decoder, so a character split across tokens
    (emoji, CJK) is emitted only once complete: no piece ever holds a broken sequence. With stop strings, the last
    `len(stop) - 1` characters are held back until we know they do not start a stop string. The pieces concatenate
    to exactly what `generate_text` returns.
    """
    config = config if config is not None else GenerationConfig()
    ids, _ = encode_prompts(tokenizer, [prompt], tokenizer.eos_token_id, _model_device(model))
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    hold = max((len(s) for s in config.stop), default=1) - 1
    pending = ""
    tokens = token_source(model, ids, config, tokenizer=tokenizer, draft_model=draft_model, stats=stats)
    for new in tokens:
        row = new[0].tolist()
        ended = config.eos_token_id is not None and config.eos_token_id in row
        if ended:
            row = row[: row.index(config.eos_token_id)]
        pending += decoder.decode(tokenizer.decode_bytes(row))
        pending, stopped = _cut_at_stop(pending, config.stop)
        if stopped or ended:
            getattr(tokens, "close", lambda: None)()  # stop the generator now, not whenever it is collected
            break
        if len(pending) > hold:
            yield pending[: len(pending) - hold]
            pending = pending[len(pending) - hold :]
    else:
        pending += decoder.decode(b"", final=True)
        pending = _cut_at_stop(pending, config.stop)[0]
    if pending:
        yield pending
