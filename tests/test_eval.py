"""Sliding-window perplexity: every token scored once, with the context the method promises."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from toyllm.gpt2 import GPT2Config, GPT2LMHeadModel
from toyllm.tokenizer import load_tokenizer
from toyllm.train.errors import InvalidArgumentError
from toyllm.train.evaluate import load_eval_tokens, perplexity, sliding_window_nll


@pytest.fixture(scope="module")
def model():
    """GPT-2's vocabulary, for tests with real text."""
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=32)).eval()


@pytest.fixture(scope="module")
def small():
    """A 512-word vocabulary: the brute-force reference runs one forward per token, so keep forwards cheap."""
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=32, vocab_size=512)).eval()


def brute_force_nll(model, ids: torch.Tensor, stride: int, max_length: int) -> float:
    """One forward per token: token i predicted from the window that scores it, as the method defines windows."""
    n, step, total = ids.numel(), min(stride, max_length - 1), 0.0
    prev_end = 0
    while prev_end < n:
        end = min(max_length if prev_end == 0 else prev_end + step, n)
        start = max(0, end - max_length)
        assert end - start <= max_length
        for i in range(max(prev_end, 1), end):
            assert i - start >= 1 and (prev_end == 0 or i - start >= max_length - step)  # the promised context
            with torch.no_grad():
                logits = model(ids[start:i][None])[0, -1]
            total -= float(F.log_softmax(logits, -1)[ids[i]])
        prev_end = end
    return total


@pytest.mark.parametrize("stride", [1, 7, 16, 32])
def test_sliding_window_matches_its_definition(small, stride):
    ids = torch.randint(0, 512, (70,), generator=torch.Generator().manual_seed(1))
    nll, scored, _ = sliding_window_nll(small, ids, stride=stride, max_length=32)
    assert scored == 69  # every token but the first, once
    assert nll == pytest.approx(brute_force_nll(small, ids, stride, 32), rel=1e-5)


def test_short_text_is_one_forward(small):
    ids = torch.randint(0, 512, (20,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = float(small(ids[None], labels=ids[None]).loss) * 19
    nll, scored, windows = sliding_window_nll(small, ids, stride=4)
    assert windows == 1 and scored == 19 and nll == pytest.approx(expected, rel=1e-5)


def test_perplexity_and_bits_per_byte(model, tmp_path):
    tok = load_tokenizer()
    path = tmp_path / "t.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 4, encoding="utf-8")
    ids = load_eval_tokens(path, tok)
    assert ids.tolist() == tok.encode(path.read_text())
    result = perplexity(model, ids, tok, stride=16)
    assert result.perplexity == pytest.approx(math.exp(result.loss))
    assert result.bytes == len(tok.decode_bytes(ids[1:].tolist()))
    assert result.bits_per_byte == pytest.approx(result.loss * result.tokens / math.log(2) / result.bytes)


def test_bad_stride(model):
    with pytest.raises(InvalidArgumentError, match="stride"):
        sliding_window_nll(model, torch.arange(10), stride=64)
