"""Perplexity of a text with the sliding-window method of the `transformers` perplexity guide.

GPT-2 sees at most `max_length` (1024) tokens. Cutting a long text into disjoint 1024-token pieces would make
the first tokens of every piece predicted from almost no context, and the perplexity worse than the model is.
Instead the window slides by `stride` tokens: each window is `max_length` long, but only its tokens not scored
by an earlier window count, so every token (except the very first, which has nothing to be predicted from) is
scored exactly once, with at least `max_length - stride` tokens of context. Smaller stride: more context, lower
perplexity, more compute. The windows are those of the guide, except that (1) the last window also reaches back
a full `max_length`, and (2) stride = max_length acts as max_length - 1, so that the first token of a window
still has one token of context (the guide's loop silently skips that token instead).

    loss        mean negative log-likelihood per scored token, in nats
    perplexity  exp(loss)
    bits/byte   total NLL in bits / UTF-8 bytes of the scored tokens: comparable across tokenizers
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from toyllm.generation import check_token_ids
from toyllm.gpt2.model import GPT2LMHeadModel
from toyllm.train.data import PreparedData, iter_pieces, iter_text
from toyllm.train.errors import DataError, InvalidArgumentError


@dataclass
class PerplexityResult:
    tokens: int  # tokens scored
    loss: float
    perplexity: float
    bits_per_byte: float
    bytes: int
    windows: int
    stride: int
    max_length: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_window(stride: int | None, max_length: int | None) -> None:
    """Reject a window that cannot work, before any loading. A window of fewer than 2 tokens scores nothing (its
    step, max_length - 1, would be 0 and the loop would never end); a stride below 1 never moves. None: default."""
    if max_length is not None and max_length < 2:
        raise InvalidArgumentError(
            f"max_length must be >= 2 (a window needs one token to predict from), got {max_length}"
        )
    if stride is not None and stride < 1:
        raise InvalidArgumentError(f"stride must be >= 1, got {stride}")


def _resolve_window(model: GPT2LMHeadModel, stride: int | None, max_length: int | None) -> tuple[int, int]:
    """(stride, max_length), checked, with the defaults filled in: the model's context and half of it."""
    check_window(stride, max_length)
    max_length = max_length if max_length is not None else model.config.n_positions
    stride = stride if stride is not None else max(1, max_length // 2)
    if max_length > model.config.n_positions:
        raise InvalidArgumentError(f"max_length {max_length} exceeds the model's context of {model.config.n_positions}")
    if not 1 <= stride <= max_length:
        raise InvalidArgumentError(f"stride must be in 1..{max_length} (the window length), got {stride}")
    return stride, max_length


@torch.no_grad()
def sliding_window_nll(
    model: GPT2LMHeadModel,
    ids: torch.Tensor,
    stride: int | None = None,
    max_length: int | None = None,
    on_window: Callable[[int], None] | None = None,
) -> tuple[float, int, int]:
    """(sum of NLL in nats, tokens scored, windows run) over the 1-D token tensor `ids`.

    `max_length` defaults to the model's context, `stride` to half of `max_length` (512 for GPT-2).
    """
    stride, max_length = _resolve_window(model, stride, max_length)
    if ids.numel() < 2:
        raise DataError("the text has fewer than 2 tokens: nothing to predict")
    check_token_ids(ids, model, "evaluation text")
    device = next(model.parameters()).device
    model.eval()
    seq_len = ids.numel()
    step = min(stride, max_length - 1)  # a window must keep one token of context before its first new target
    nll, scored, windows, prev_end = 0.0, 0, 0, 0
    while prev_end < seq_len:
        end = min(max_length if prev_end == 0 else prev_end + step, seq_len)
        start = max(0, end - max_length)  # as much context as fits before the new targets
        window = ids[start:end].to(device)[None]  # (1, L)
        logits = model(window)[0, :-1].float()  # (L - 1, vocab): position i predicts token start + i + 1
        targets = window[0, 1:]  # (L - 1,)
        first = max(prev_end, 1) - (start + 1)  # targets before this one were scored by an earlier window
        logp = F.log_softmax(logits[first:], dim=-1)
        nll -= float(logp.gather(1, targets[first:, None]).sum())
        scored += targets.numel() - first
        windows += 1
        prev_end = end
        if on_window is not None:
            on_window(end)
    return nll, scored, windows


def perplexity(
    model: GPT2LMHeadModel,
    ids: torch.Tensor,
    tokenizer: Any,
    stride: int | None = None,
    max_length: int | None = None,
    on_window: Callable[[int], None] | None = None,
) -> PerplexityResult:
    """Perplexity and bits per byte of a token sequence (bytes are those of the scored tokens, EOS excluded)."""
    stride, max_length = _resolve_window(model, stride, max_length)
    nll, scored, windows = sliding_window_nll(model, ids, stride, max_length, on_window)
    scored_ids = [i for i in ids[1:].tolist() if i != tokenizer.eos_token_id]
    n_bytes = len(tokenizer.decode_bytes(scored_ids))
    loss = nll / scored
    return PerplexityResult(
        tokens=scored,
        loss=loss,
        perplexity=math.exp(min(loss, 700.0)),
        bits_per_byte=nll / math.log(2) / max(1, n_bytes),
        bytes=n_bytes,
        windows=windows,
        stride=stride,
        max_length=max_length,
    )


def load_eval_tokens(path: str | Path, tokenizer: Any, max_tokens: int | None = None) -> torch.Tensor:
    """Tokens to evaluate: a text file (tokenized here, block by block), or a prepared directory's val.bin.

    `max_tokens` None means all; otherwise it must be >= 1 (0 used to mean "all" and -1 to drop the last token)."""
    if max_tokens is not None and max_tokens < 1:
        raise InvalidArgumentError(f"max_tokens must be >= 1, got {max_tokens}")
    source = Path(path).expanduser()
    if source.is_dir():
        data = PreparedData.open(source)
        if len(data.val) == 0:  # scoring train.bin instead would report a training-set perplexity as if held out
            raise DataError(
                f"{source} has no validation tokens (prepared with --val-fraction 0): prepare it again with a "
                "validation share, or evaluate a text file"
            )
        ids = torch.from_numpy(np.asarray(data.val[:max_tokens], dtype=np.int64))
    elif source.is_file():
        pieces: list[int] = []
        for piece in iter_pieces(iter_text(source)):
            pieces.extend(tokenizer.encode(piece))
            if max_tokens is not None and len(pieces) >= max_tokens:
                break
        ids = torch.tensor(pieces[:max_tokens], dtype=torch.long)
    else:
        raise DataError(f"evaluation data not found: {source} (a text file or a directory from `toyllm prepare`)")
    if ids.numel() < 2:
        raise DataError(f"{source} holds fewer than 2 tokens: nothing to evaluate")
    return ids
