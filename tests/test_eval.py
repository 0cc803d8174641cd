"""Sliding-window perplexity: every token scored once, with the context the method promises."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from toyllm.gpt2 import GPT2Config, GPT2LMHeadModel
from toyllm.tokenizer import load_tokenizer
from toyllm.train.data import prepare
from toyllm.train.errors import DataError, InvalidArgumentError
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


def test_ids_outside_the_vocabulary_are_a_clear_error(small):
    ids = torch.tensor([1, 2, small.config.vocab_size])  # data prepared with another model's tokenizer
    with pytest.raises(InvalidArgumentError, match="outside the model's vocabulary"):
        sliding_window_nll(small, ids, stride=4)


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


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_length": 1}, "max_length"),
        ({"max_length": 0}, "max_length"),
        ({"max_length": -3}, "max_length"),
        ({"stride": 0}, "stride"),
        ({"stride": -1}, "stride"),
    ],
)
def test_bad_window_raises_instead_of_hanging(small, kwargs, message):
    """max_length 1 made the step 0 (an endless loop) and 0 was silently the default: both must be errors."""
    ids = torch.arange(10)
    with pytest.raises(InvalidArgumentError, match=message):
        sliding_window_nll(small, ids, **kwargs)
    with pytest.raises(InvalidArgumentError, match=message):
        perplexity(small, ids, load_tokenizer(), **kwargs)


def test_max_length_two_scores_every_token(small):
    """The smallest window that works: one token of context, one target."""
    ids = torch.randint(0, 512, (6,), generator=torch.Generator().manual_seed(3))
    nll, scored, windows = sliding_window_nll(small, ids, max_length=2)
    assert (scored, windows) == (5, 5) and nll == pytest.approx(brute_force_nll(small, ids, 1, 2), rel=1e-5)


@pytest.mark.parametrize("max_tokens", [0, -1])
def test_bad_max_tokens(tmp_path, max_tokens):
    """0 used to mean "all tokens" and -1 quietly dropped the last one."""
    path = tmp_path / "t.txt"
    path.write_text("a few words to evaluate", encoding="utf-8")
    with pytest.raises(InvalidArgumentError, match="max_tokens"):
        load_eval_tokens(path, load_tokenizer(), max_tokens=max_tokens)


def test_max_tokens_limits_a_text_file(tmp_path):
    tok = load_tokenizer()
    path = tmp_path / "t.txt"
    path.write_text("a few words to evaluate " * 5, encoding="utf-8")
    assert load_eval_tokens(path, tok, max_tokens=3).tolist() == tok.encode(path.read_text())[:3]


def test_a_prepared_folder_without_validation_tokens_is_refused(tmp_path):
    """It used to score train.bin without a word, a training-set perplexity passed off as a held-out one."""
    src = tmp_path / "t.txt"
    src.write_text("The quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    tok = load_tokenizer()
    held_out = prepare([src], tmp_path / "with_val", val_fraction=0.1, tokenizer=tok).directory
    assert load_eval_tokens(held_out, tok).numel() > 2
    train_only = prepare([src], tmp_path / "no_val", val_fraction=0, tokenizer=tok).directory
    with pytest.raises(DataError, match="no validation tokens"):
        load_eval_tokens(train_only, tok)
