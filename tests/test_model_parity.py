"""Our GPT-2 against `transformers.GPT2LMHeadModel`: same checkpoint, same logits, in both directions.

Why random weights: the Hub is out of reach in tests, and a model whose every parameter (biases and LayerNorms
included) is perturbed exercises each weight's layout at least as hard as the real GPT-2 does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from toyllm.gpt2 import GPT2LMHeadModel
from toyllm.kv_cache import KVCache

transformers = pytest.importorskip("transformers")

# The project asks for logits within 1e-4; the float32 differences here are below 1e-6, and at 1e-4 an exact (erf)
# GELU in place of GPT-2's tanh one passed on two of the four configurations below. At 1e-5 it fails three of them
# (the 8-wide one-layer model differs by 4e-6 only).
ATOL = 1e-5
TINY_CONFIGS: list[dict[str, Any]] = [
    dict(n_layer=1, n_head=1, n_embd=8, n_positions=16, vocab_size=50),
    dict(n_layer=2, n_head=4, n_embd=32, n_positions=64, vocab_size=101, layer_norm_epsilon=1e-6),
    dict(n_layer=3, n_head=2, n_embd=48, n_positions=40, vocab_size=257, layer_norm_epsilon=1e-3, n_inner=80),
    dict(
        n_layer=2,
        n_head=3,
        n_embd=24,
        n_positions=32,
        vocab_size=64,
        tie_word_embeddings=False,
        activation_function="gelu_pytorch_tanh",
    ),
]
CONFIG_IDS = ["1L1H", "2L4H-eps1e-6", "3L2H-n_inner", "untied"]


def hf_model(**kwargs: Any) -> Any:
    """A randomly initialised transformers GPT-2 whose every parameter is moved off its init value."""
    vocab = kwargs.get("vocab_size", 50257)
    config = transformers.GPT2Config(bos_token_id=vocab - 1, eos_token_id=vocab - 1, **kwargs)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # non-zero biases, non-trivial LayerNorm scales
    return model


def save_hf(model: Any, directory: Path, fmt: str) -> Path:
    if fmt == "safetensors":
        model.save_pretrained(directory)
    else:  # transformers 5 only writes safetensors; this is the layout its predecessors wrote as .bin
        model.config.save_pretrained(directory)
        torch.save(model.state_dict(), directory / "pytorch_model.bin")
    return directory


def random_ids(vocab: int, batch: int, length: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length))


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("kwargs", TINY_CONFIGS, ids=CONFIG_IDS)
def test_transformers_checkpoint_gives_same_logits(tmp_path: Path, kwargs: dict[str, Any], fmt: str) -> None:
    torch.manual_seed(0)
    theirs = hf_model(**kwargs)
    ours = GPT2LMHeadModel.from_pretrained(save_hf(theirs, tmp_path, fmt))
    ids = random_ids(kwargs["vocab_size"], 2, kwargs["n_positions"])  # the whole context window
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kwargs", TINY_CONFIGS, ids=CONFIG_IDS)
def test_our_checkpoint_loads_in_transformers(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    torch.manual_seed(1)
    ours = GPT2LMHeadModel.from_pretrained(save_hf(hf_model(**kwargs), tmp_path / "hf", "safetensors"))
    ours.save_pretrained(tmp_path / "ours")
    theirs, info = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ids = random_ids(kwargs["vocab_size"], 2, 10)
    with torch.no_grad():
        torch.testing.assert_close(theirs.eval()(ids).logits, ours(ids), atol=ATOL, rtol=0)


def hf_greedy(theirs: Any, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """transformers' own greedy `generate`, exactly `new_tokens` long: the reference for our decoding loops."""
    return theirs.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=theirs.config.eos_token_id,
    )


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[GPT2LMHeadModel, Any]:
    torch.manual_seed(2)
    theirs = hf_model(**TINY_CONFIGS[1])
    ours = GPT2LMHeadModel.from_pretrained(save_hf(theirs, tmp_path_factory.mktemp("pair"), "safetensors"))
    return ours, theirs


def test_greedy_tokens_match_generate(pair: tuple[GPT2LMHeadModel, Any]) -> None:
    ours, theirs = pair
    prompt = random_ids(ours.config.vocab_size, 1, 5)
    cache = KVCache.for_model(ours, batch_size=1, max_len=20)
    with torch.no_grad():
        logits = ours(prompt, cache=cache)
        tokens = []
        for _ in range(8):  # decode with our KV cache, one token at a time
            next_token = logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(int(next_token))
            logits = ours(next_token, cache=cache)
        expected = hf_greedy(theirs, prompt, 8)
    assert tokens == expected[0, 5:].tolist()


def test_loss_with_labels_matches(pair: tuple[GPT2LMHeadModel, Any]) -> None:
    ours, theirs = pair
    ids = random_ids(ours.config.vocab_size, 3, 12)
    labels = ids.clone()
    labels[0, :4] = -100  # ignored positions, as for a prompt
    with torch.no_grad():
        out, ref = ours(ids, labels=labels), theirs(ids, labels=labels)
    torch.testing.assert_close(out.loss, ref.loss, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.logits, ref.logits, atol=ATOL, rtol=0)


def test_left_padding_matches(pair: tuple[GPT2LMHeadModel, Any]) -> None:
    ours, theirs = pair
    ids = random_ids(ours.config.vocab_size, 3, 9)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[2, :6] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # padding takes no position
    with torch.no_grad():
        out = ours(ids, attention_mask=mask, position_ids=position_ids)
        ref = theirs(ids, attention_mask=mask, position_ids=position_ids).logits
    real = mask.bool()  # padded positions' outputs are meaningless in both models
    torch.testing.assert_close(out[real], ref[real], atol=ATOL, rtol=0)


@pytest.mark.slow
def test_full_gpt2_shape_both_directions(tmp_path: Path) -> None:
    torch.manual_seed(3)
    theirs = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()  # 124M, the shape of `gpt2`
    ours = GPT2LMHeadModel.from_pretrained(save_hf(theirs, tmp_path / "hf", "safetensors"))
    assert ours.num_parameters() == theirs.num_parameters()
    ids = random_ids(50257, 1, 24)
    with torch.no_grad():
        expected = theirs(ids).logits
        torch.testing.assert_close(ours(ids), expected, atol=ATOL, rtol=0)
        del theirs
        ours.save_pretrained(tmp_path / "ours")
        back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "ours").eval()
        torch.testing.assert_close(back(ids).logits, expected, atol=ATOL, rtol=0)
    assert (tmp_path / "ours" / "vocab.json").is_file() and (tmp_path / "ours" / "merges.txt").is_file()
