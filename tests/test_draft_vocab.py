"""A draft that scores only part of the vocabulary (`restrict_vocab`), how its tokens are chosen, and the commands
that use it. The exactness of speculative decoding with such a draft is in test_speculative.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from kernel_helpers import KernelCalls, needs_kernel
from safetensors.torch import load_file
from train_helpers import prepared_shakespeare

from toyllm.cli.main import run_app
from toyllm.errors import InvalidArgumentError
from toyllm.gpt2.config import GPT2Config
from toyllm.gpt2.model import GPT2LMHeadModel
from toyllm.speculative import draft_vocabulary, frequent_tokens


def tiny(seed: int = 0, vocab: int = 64) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=32, n_embd=16, n_layer=2, n_head=2)).eval()


def run(capsys, *args: object) -> tuple[int, str, str]:
    code = run_app([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(code: int, err: str, fragment: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and fragment in lines[0] and "Traceback" not in err, err


# -- the model --------------------------------------------------------------------------------------------------


def test_restricted_logits_equal_the_full_ones_on_kept_tokens() -> None:
    model = tiny()
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        full = model(ids)  # (2, 9, 64)
        model.restrict_vocab([5, 1, 40, 5, 63])  # repeats and order do not matter
        kept = torch.tensor([1, 5, 40, 63])
        restricted = model(ids)
    assert restricted.shape == full.shape
    torch.testing.assert_close(restricted[..., kept], full[..., kept], rtol=1e-5, atol=1e-6)
    others = torch.ones(64, dtype=torch.bool)
    others[kept] = False
    assert bool(torch.isneginf(restricted[..., others]).all())
    assert torch.equal(model.head_vocab, kept)
    model.restrict_vocab(None)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), full)


def test_restriction_is_inference_only_and_checked() -> None:
    model = tiny()
    model.restrict_vocab(range(10))
    ids = torch.randint(0, 10, (1, 6))
    with pytest.raises(ValueError, match="inference"):
        model(ids, labels=ids)
    for bad in ([], [-1, 2], [64]):
        with pytest.raises(ValueError, match="0..63"):
            model.restrict_vocab(bad)


def test_restriction_moves_with_the_model_and_is_not_counted_twice() -> None:
    model = tiny()
    n = model.num_parameters()
    model.restrict_vocab([3, 9, 27])
    assert model.num_parameters() == n
    model.to(torch.float64)
    assert model.head_subset is not None and model.head_subset.weight.dtype == torch.float64
    with torch.no_grad():
        logits = model(torch.tensor([[3, 9]]))
    assert logits.dtype == torch.float64 and torch.isfinite(logits[0, :, [3, 9, 27]]).all()


def test_a_quantized_head_cannot_be_restricted() -> None:
    from toyllm.quantize import quantize_int8

    model = quantize_int8(tiny())
    with pytest.raises(ValueError, match="before quantizing"):
        model.restrict_vocab([1, 2])


def test_restricted_model_saves_the_full_checkpoint(tmp_path) -> None:
    """The kept rows are an inference-time copy: the checkpoint is the unrestricted model, as transformers expects."""
    model = tiny()
    model.save_pretrained(tmp_path / "full")
    model.restrict_vocab(range(8))
    model.save_pretrained(tmp_path / "restricted")
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "restricted" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    reloaded = GPT2LMHeadModel.from_pretrained(tmp_path / "restricted")
    assert reloaded.head_subset is None


@needs_kernel
def test_restricted_head_goes_through_the_cpu_kernel() -> None:
    from toyllm import kernels

    assert kernels.load() is not None, kernels.unavailable_reason()
    model = tiny()
    model.restrict_vocab(range(0, 64, 3))
    ids = torch.randint(0, 64, (1, 5))
    with torch.inference_mode():
        expected = model(ids)
        kernels.use_cpu_kernels(model)
        assert type(model.head_subset).__name__ == "GemvLinear"
        with KernelCalls() as calls:
            got = model(ids[:, :1])  # one row: the kernel's path
    assert calls.rows == [1] * (4 * model.config.n_layer + 1)  # the blocks' Linears, then the 22-token head
    torch.testing.assert_close(got[0, 0], expected[0, 0], rtol=1e-5, atol=1e-5)


# -- which tokens -------------------------------------------------------------------------------------------------


def test_frequent_tokens_counts_and_breaks_ties_by_id() -> None:
    tokens = np.array([7, 7, 7, 3, 3, 9, 9, 1, 4], dtype=np.uint16)
    assert frequent_tokens(tokens, 1, 10).tolist() == [7]
    assert frequent_tokens(tokens, 3, 10).tolist() == [3, 7, 9]  # 3 and 9 tie at two; both beat the ones
    assert frequent_tokens(tokens, 4, 10).tolist() == [1, 3, 7, 9]  # 1 and 4 tie at one: the lower id wins
    assert frequent_tokens(tokens, 50, 10).tolist() == list(range(10))


def test_draft_vocabulary_sources(tmp_path) -> None:
    assert draft_vocabulary(5, 100).tolist() == [0, 1, 2, 3, 4]
    assert draft_vocabulary(3, 100, always=(99,)).tolist() == [0, 1, 2, 99]
    assert draft_vocabulary(3, 100, always=(None,)).tolist() == [0, 1, 2]  # a config without an EOS id
    data = prepared_shakespeare(tmp_path, chars=20_000)
    train = np.memmap(data / "train.bin", dtype=np.uint16, mode="r")
    ids = draft_vocabulary(100, 50257, data)
    counts = np.bincount(train, minlength=50257)
    assert counts[ids.numpy()].min() >= np.sort(counts)[-100]  # no left-out token is more frequent than a kept one
    with pytest.raises(InvalidArgumentError, match="1..50257"):
        draft_vocabulary(0, 50257)


# -- the commands -------------------------------------------------------------------------------------------------

TINY = ["--model", "random:gpt2-tiny", "--seed", "0", "--max-new-tokens", "12", "--temperature", "0", "--device", "cpu"]


def test_generate_with_a_restricted_draft_prints_the_plain_greedy_text(capsys) -> None:
    plain = run(capsys, "generate", "Once upon a time", *TINY)
    spec = run(capsys, "generate", "Once upon a time", *TINY, "--draft-layers", "1", "--draft-vocab", "2000")
    assert plain[0] == 0 and spec[0] == 0, spec[2]
    assert spec[1] == plain[1] and "acceptance" in spec[2]


def test_restricted_draft_keeps_the_eos_that_generation_stops_on() -> None:
    """The end of text generation stops on (the tokenizer's) is kept, even where the model's config has none."""
    from toyllm.cli.common import load_draft
    from toyllm.gpt2 import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=8, n_layer=2, n_head=2, eos_token_id=None))
    for eos, kept in [(None, [0, 1, 2]), (50, [0, 1, 2, 50])]:
        draft = load_draft(model, None, 1, torch.device("cpu"), None, draft_vocab=3, eos_token_id=eos)
        assert draft is not None and draft.head_vocab is not None and draft.head_vocab.tolist() == kept


def test_generate_draft_vocab_errors(capsys, tmp_path) -> None:
    one_line_error(*run(capsys, "generate", "Hi", *TINY, "--draft-vocab", "100")[::2], "needs a draft")
    code, _, err = run(capsys, "generate", "Hi", *TINY, "--draft-layers", "1", "--draft-vocab-data", tmp_path)
    one_line_error(code, err, "--draft-vocab N")
    code, _, err = run(capsys, "generate", "Hi", *TINY, "--draft-layers", "1", "--draft-vocab", "0")
    one_line_error(code, err, "1..50257")
    code, _, err = run(
        capsys, "generate", "Hi", *TINY, "--draft-layers", "1", "--draft-vocab", "9", "--draft-vocab-data", tmp_path
    )
    one_line_error(code, err, "meta.json")


def test_bench_speculative_with_a_restricted_draft(capsys, tmp_path) -> None:
    """The benchmark runs end to end, its greedy outputs match plain decoding, and its theory column is the formula."""
    from toyllm.bench.speculative import theoretical_speedup

    args = ["bench", "speculative", "--target", "random:gpt2-tiny", "--cases", "self,same", "--lookaheads", "1,3"]
    args += ["--self-layers", "1", "-n", "10", "--prompt-len", "6", "--device", "cpu", "--draft-vocab", "3000"]
    text = tmp_path / "prompts.txt"
    text.write_text("Shall I compare thee to a summer's day? Thou art more lovely and more temperate. " * 4)
    args += ["--prompt-file", text, "--prompts", "3", "--repeats", "2"]
    code, out, err = run(capsys, *args, "--out", tmp_path)
    assert code == 0, err
    results = json.loads((tmp_path / "speculative.json").read_text())
    assert results["settings"]["draft_vocab"] == 3000 and results["settings"]["prompts"] == 3
    assert results["settings"]["repeats"] == 2
    tokens = 3 * 10  # every prompt makes all its tokens (EOS ignored)
    assert all(r["tokens_per_second"] * r["seconds"]["total"] == pytest.approx(tokens) for r in results["rows"])
    assert (tmp_path / "speculative_speedup.png").is_file()
    rows = results["rows"]
    assert sorted((r["case"], r["lookahead"]) for r in rows) == [("same", 1), ("same", 3), ("self", 1), ("self", 3)]
    for row in rows:
        assert row["outputs_match"] is True
        if row["case"] == "same":  # the unrestricted target drafting for itself accepts everything
            assert row["alpha"] == 1.0
        seconds = row["seconds"]
        assert 0 < seconds["prompt"] < seconds["total"]
        assert row["prompt_forwards"] == 2 * 3  # both models filled with each of the 3 prompts, once
        decode_step = (seconds["total"] - seconds["prompt"]) / tokens
        plain_step = results["plain"][row["case"]]["target"]["step_seconds"]
        assert row["decode_speedup"] == pytest.approx(plain_step / decode_step)
        K, alpha, c = row["lookahead"], row["alpha"], row["cost_ratio"]
        if alpha < 1:
            expected = (1 - alpha ** (K + 1)) / ((1 - alpha) * (c * K + 1))
            assert row["theoretical_speedup"] == pytest.approx(expected)
    assert theoretical_speedup(1.0, 4, 0.0) == 5.0 and theoretical_speedup(0.0, 4, 0.25) == 0.5
    assert "| self | constant | 1 |" in out
    code, _, err = run(capsys, *args, "--draft-vocab-data", tmp_path, "--out", tmp_path / "x")
    one_line_error(code, err, "meta.json")
    code, _, err = run(capsys, *args[:5], "same", "--draft-vocab", "10", "--out", tmp_path / "y")
    one_line_error(code, err, "`draft` or `self` case")
