"""Weight-only int8: the rounding is bounded, the layers swap cleanly, and the model still computes the same thing."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import toyllm.quantize as quantize
from toyllm.generation import GenerationConfig, generate
from toyllm.gpt2 import GPT2Config, GPT2LMHeadModel
from toyllm.quantize import (
    Int8Linear,
    PackedLinear,
    int8_linear,
    pack_for_cpu,
    packed_kind_available,
    quantize_int8,
    quantize_weight,
)


@pytest.fixture(scope="module")
def model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config.from_name("gpt2-tiny")).eval()


def test_rounding_error_is_at_most_half_a_step() -> None:
    w = torch.randn(64, 48) * torch.logspace(-3, 1, 64)[:, None]  # rows of very different magnitudes
    q, scale = quantize_weight(w)
    assert q.dtype == torch.int8 and scale.shape == (64,)
    assert int(q.abs().max()) == 127  # every row uses the full range: its largest weight maps to +-127
    error = (q.float() * scale[:, None] - w).abs()
    assert bool((error <= scale[:, None] / 2 + 1e-7).all())


def test_zero_row_does_not_divide_by_zero() -> None:
    w = torch.randn(4, 8)
    w[2] = 0
    q, scale = quantize_weight(w)
    assert torch.isfinite(scale).all() and bool((q[2] == 0).all())


@pytest.mark.parametrize("fused", [True, False])
def test_int8_linear_equals_linear_with_the_dequantized_weight(monkeypatch: pytest.MonkeyPatch, fused: bool) -> None:
    if fused and not quantize.HAS_INT8_MM:
        pytest.skip("this torch has no _weight_int8pack_mm")
    monkeypatch.setattr(quantize, "HAS_INT8_MM", fused)  # both kernels: the fused one and dequantize-on-the-fly
    linear = nn.Linear(48, 40)
    layer = Int8Linear.from_linear(linear)
    x = torch.randn(3, 5, 48)
    expected = F.linear(x, layer.dequantize(), linear.bias)
    torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer(x), linear(x), rtol=0, atol=0.05)  # and close to the unquantized layer


def test_int8_linear_without_bias() -> None:
    q, scale = quantize_weight(torch.randn(6, 8))
    x = torch.randn(2, 8)
    torch.testing.assert_close(int8_linear(x, q, scale, None), x @ (q.float() * scale[:, None]).t())


def test_every_linear_is_replaced_and_the_embedding_stays_float(model: GPT2LMHeadModel) -> None:
    q = quantize_int8(copy.deepcopy(model))
    assert not any(type(m) is nn.Linear for m in q.modules())
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    assert sum(isinstance(m, Int8Linear) for m in q.modules()) == n_linear  # lm_head included
    lm_head: nn.Module = q.lm_head
    assert isinstance(lm_head, Int8Linear) and lm_head.weight.dtype == torch.int8
    assert q.transformer.wte.weight.dtype == torch.float32  # the tied embedding: quantized as a copy
    torch.testing.assert_close(q.transformer.wte.weight, model.transformer.wte.weight, rtol=0, atol=0)
    assert not any(p.requires_grad for p in lm_head.parameters())


def test_quantized_logits_are_close_and_greedy_text_matches(model: GPT2LMHeadModel) -> None:
    q = quantize_int8(copy.deepcopy(model))
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref, out = model(ids), q(ids)
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
    config = GenerationConfig(max_new_tokens=8, temperature=0.0, eos_token_id=None)
    assert generate(q, ids, config).shape == (2, 32)  # the KV-cache path runs on the quantized model


def test_quantized_model_casts_to_bfloat16(model: GPT2LMHeadModel) -> None:
    q = quantize_int8(copy.deepcopy(model)).to(torch.bfloat16)
    lm_head: nn.Module = q.lm_head
    assert isinstance(lm_head, Int8Linear)
    assert lm_head.weight.dtype == torch.int8 and lm_head.scale.dtype == torch.bfloat16
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    with torch.inference_mode():
        assert q(ids).dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("kind", "bytes_per_weight", "tolerance"), [("onednn", 4, 1e-5), ("fp16", 2, 1e-3), ("int8-dynamic", 1, 0.1)]
)
def test_packed_layers_replace_every_linear(
    model: GPT2LMHeadModel, kind: quantize.PackedKind, bytes_per_weight: int, tolerance: float
) -> None:
    if not packed_kind_available(kind):
        pytest.skip(f"this torch build cannot run {kind} layers")
    q = pack_for_cpu(copy.deepcopy(model), kind)
    assert not any(type(m) is nn.Linear for m in q.modules())
    lm_head: nn.Module = q.lm_head
    assert isinstance(lm_head, PackedLinear)
    assert lm_head.packed_bytes >= bytes_per_weight * model.lm_head.weight.numel()
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        ref, out = model(ids), q(ids)
    assert (out - ref).abs().max() < tolerance * ref.abs().max()
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_packing_refuses_what_it_cannot_run(model: GPT2LMHeadModel) -> None:
    with pytest.raises(ValueError, match="float32 model"):
        pack_for_cpu(copy.deepcopy(model).to(torch.bfloat16), "fp16")
