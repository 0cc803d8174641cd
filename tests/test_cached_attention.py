"""Fused attention over a KV cache (toyllm/kernels/attention.py): SDPA's numbers with the bottom-right causal mask,
the cache written as `KVCache.update` writes it, every query row independent of the others (what keeps speculative
greedy output equal to plain greedy output), and torch's own path wherever the operator does not apply."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from kernel_helpers import needs_kernel

from toyllm import kernels
from toyllm.errors import InvalidArgumentError
from toyllm.generation import GenerationConfig, generate
from toyllm.gpt2 import GPT2Config, GPT2LMHeadModel
from toyllm.gpt2 import model as model_module
from toyllm.kernels.attention import MAX_NEW_TOKENS, CachedAttention, use_cached_attention
from toyllm.kv_cache import KVCache

pytestmark = needs_kernel


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    assert kernels.load() is not None, kernels.unavailable_reason()


def _reference(qkv: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int) -> torch.Tensor:
    """What GPT2Attention does: write the new rows into the cache copies k, v; SDPA with the bottom-right mask."""
    B, T, C3 = qkv.shape
    H, D = k.shape[1], k.shape[3]
    q, kn, vn = (t.view(B, T, H, D).transpose(1, 2) for t in qkv.split(C3 // 3, dim=2))  # 3 x (B, H, T, D)
    k[:, :, past : past + T], v[:, :, past : past + T] = kn, vn
    mask = torch.full((T, past + T), float("-inf")).triu(diagonal=past + 1)  # (T, S)
    y = F.scaled_dot_product_attention(q, k[:, :, : past + T], v[:, :, : past + T], attn_mask=mask)
    return y.transpose(1, 2).reshape(B, T, C3 // 3)  # (B, T, C)


# (batch, new rows, heads, head size, cached rows): one-token steps, verifications, a prefill from nothing, head sizes
# that are not a multiple of the 8-float vector (12, 5), a long cache (several vectors of scores plus a tail).
SHAPES = [(1, 1, 6, 64, 60), (1, 3, 6, 64, 60), (1, 9, 4, 16, 200), (2, 5, 4, 16, 0), (3, 2, 2, 12, 7), (1, 4, 3, 5, 9)]
SHAPES += [(2, 21, 2, 40, 3)]  # two groups of queries (16 share a pass over the keys), 32 + 8 outputs per head


@pytest.mark.parametrize(("B", "T", "H", "D", "past"), SHAPES)
def test_the_operator_is_sdpa_over_the_cache_with_the_bottom_right_mask(
    B: int, T: int, H: int, D: int, past: int
) -> None:
    torch.manual_seed(0)
    L = past + T + 3  # rows past the new ones must stay untouched
    qkv = torch.randn(B, T, 3 * H * D)
    k, v = torch.randn(B, H, L, D), torch.randn(B, H, L, D)
    k_ref, v_ref = k.clone(), v.clone()
    y = torch.ops.toyllm.cached_attention(qkv, k, v, past)
    expected = _reference(qkv, k_ref, v_ref, past)
    assert torch.equal(k, k_ref) and torch.equal(v, v_ref)  # the same cache, bit for bit
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)


# 20: across two groups of queries; 12, 5, 1: head sizes whose scalar tails are summed with and without a partner
@pytest.mark.parametrize(("T", "D"), [(5, 32), (20, 32), (6, 12), (17, 5), (17, 1)])
def test_a_row_is_the_same_bit_for_bit_alone_or_among_others(T: int, D: int) -> None:
    """T queries in one call give exactly what T one-query calls give: a verification's rows are the rows that
    plain decoding would have computed."""
    torch.manual_seed(1)
    B, H, past = 2, 3, 8
    qkv = torch.randn(B, T, 3 * H * D)
    k, v = torch.randn(B, H, 48, D), torch.randn(B, H, 48, D)
    k1, v1 = k.clone(), v.clone()
    together = torch.ops.toyllm.cached_attention(qkv, k, v, past)
    one_by_one = [torch.ops.toyllm.cached_attention(qkv[:, t : t + 1].contiguous(), k1, v1, past + t) for t in range(T)]
    assert torch.equal(together, torch.cat(one_by_one, dim=1))


def test_the_operator_refuses_what_does_not_fit() -> None:
    qkv, k = torch.randn(1, 3, 24), torch.zeros(1, 2, 4, 4)
    with pytest.raises(RuntimeError, match="holds 4 rows, not 5"):
        torch.ops.toyllm.cached_attention(qkv, k, k.clone(), 2)
    with pytest.raises(RuntimeError, match="do not fit together"):
        torch.ops.toyllm.cached_attention(torch.randn(1, 3, 30), k, k.clone(), 0)


@pytest.fixture(scope="module")
def models() -> tuple[GPT2LMHeadModel, GPT2LMHeadModel]:
    """(a tiny model, the same weights with the fused attention)."""
    torch.manual_seed(2)
    model = GPT2LMHeadModel(GPT2Config.from_name("gpt2-tiny")).eval()
    return model, use_cached_attention(copy.deepcopy(model))


def test_a_model_with_it_decodes_the_logits_of_the_plain_model(
    models: tuple[GPT2LMHeadModel, GPT2LMHeadModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, fused = models
    assert all(type(block.attn) is CachedAttention for block in fused.transformer.h)
    assert fused.state_dict().keys() == model.state_dict().keys()
    ids = torch.randint(0, model.config.vocab_size, (2, 20))
    with torch.no_grad():
        full = model(ids)  # no cache: torch's SDPA, the reference
        # The converted model builds no mask for a cached forward: its attention applies the causal rule itself.
        monkeypatch.setattr(model_module, "build_attention_mask", None)
        cache = KVCache.for_model(fused, 2, 32)
        pieces = [fused(ids[:, a:b], cache=cache) for a, b in [(0, 7), (7, 8), (8, 11), (11, 20)]]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


def test_a_long_forward_takes_sdpa_with_the_plain_models_numbers(
    models: tuple[GPT2LMHeadModel, GPT2LMHeadModel],
) -> None:
    """More than MAX_NEW_TOKENS new tokens (a long prompt, or its chunks after the first) go through SDPA, with the
    mask the module builds itself: exactly the plain model's numbers, and no call of the operator."""
    from kernel_helpers import KernelCalls

    model, fused = models
    T = MAX_NEW_TOKENS + 2
    ids = torch.randint(0, model.config.vocab_size, (1, 2 * T + 1))
    with torch.no_grad(), KernelCalls() as calls:
        cache_a, cache_b = KVCache.for_model(model, 1, 128), KVCache.for_model(fused, 1, 128)
        for a, b in [(0, T), (T, 2 * T)]:  # a first chunk (causal from an empty cache), then one with the mask
            assert torch.equal(fused(ids[:, a:b], cache=cache_b), model(ids[:, a:b], cache=cache_a))
        assert not calls.attention
        fused(ids[:, 2 * T :], cache=cache_b)  # one more token: the operator again
    assert calls.attention == [1] * fused.config.n_layer


def test_padding_dtypes_gradients_and_overflow_take_torchs_path(
    models: tuple[GPT2LMHeadModel, GPT2LMHeadModel],
) -> None:
    model, fused = models
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    valid = torch.ones(2, 9, dtype=torch.long)
    valid[0, :3] = 0  # left padding: the model's own padded mask, through SDPA

    with torch.no_grad():
        cache_a, cache_b = KVCache.for_model(model, 2, 16), KVCache.for_model(fused, 2, 16)
        expected = model(ids, cache=cache_a, attention_mask=valid)
        got = fused(ids, cache=cache_b, attention_mask=valid)
    assert torch.equal(got, expected)
    # Training (no cache) is GPT2Attention's forward: the same loss and gradients flow.
    loss = fused(ids, labels=ids).loss
    torch.testing.assert_close(loss, model(ids, labels=ids).loss)
    loss.backward()
    assert fused.transformer.h[0].attn.c_attn.weight.grad is not None
    fused.zero_grad(set_to_none=True)
    # float64: not the operator's dtype; the fallback builds its own mask and matches the plain model.
    m64, f64 = copy.deepcopy(model).double(), copy.deepcopy(fused).double()
    with torch.no_grad():
        c64a, c64b = KVCache.for_model(m64, 2, 16), KVCache.for_model(f64, 2, 16)
        m64(ids[:, :5], cache=c64a), f64(ids[:, :5], cache=c64b)
        torch.testing.assert_close(f64(ids[:, 5:], cache=c64b), m64(ids[:, 5:], cache=c64a))
        # A cache too short: the same one-line error as without the operator.
        small = KVCache.for_model(fused, 2, 8)
        with pytest.raises(InvalidArgumentError, match="KV cache overflow"):
            fused(ids, cache=small)


@pytest.mark.parametrize("lookahead", [1, 2, 4, 8])
def test_speculative_greedy_output_is_plain_greedy_output(
    models: tuple[GPT2LMHeadModel, GPT2LMHeadModel], lookahead: int
) -> None:
    """Self-speculative (the target's first layer, which shares its converted blocks) and an unrelated draft."""
    _, target = models
    torch.manual_seed(3)
    unrelated = use_cached_attention(GPT2LMHeadModel(GPT2Config.from_name("gpt2-tiny")).eval())
    config = GenerationConfig(max_new_tokens=30, temperature=0.0, eos_token_id=None, lookahead=lookahead)
    for prompt in range(3):
        ids = torch.randint(0, target.config.vocab_size, (1, 2 + 3 * prompt))
        plain = generate(target, ids, config)
        for draft in (target.first_layers(1), unrelated):
            assert torch.equal(generate(target, ids, config, draft_model=draft), plain)


def test_a_self_draft_made_before_the_conversion_gets_it_too() -> None:
    torch.manual_seed(4)
    target = GPT2LMHeadModel(GPT2Config.from_name("gpt2-tiny")).eval()
    draft = target.first_layers(1)
    use_cached_attention(target)
    assert type(draft.transformer.h[0].attn) is CachedAttention


def test_converting_only_a_self_draft_leaves_the_target_masked() -> None:
    """The draft's block 0 is the target's: the target then has one converted block and one plain one, and the
    plain one still gets its causal mask."""
    torch.manual_seed(5)
    target = GPT2LMHeadModel(GPT2Config.from_name("gpt2-tiny")).eval()
    ids = torch.randint(0, target.config.vocab_size, (1, 12))
    with torch.no_grad():
        full = target(ids)
        use_cached_attention(target.first_layers(1))
        cache = KVCache.for_model(target, 1, 16)
        pieces = [target(ids[:, :9], cache=cache), target(ids[:, 9:], cache=cache)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


def test_autocast_gradients_and_training_take_torchs_path(models: tuple[GPT2LMHeadModel, GPT2LMHeadModel]) -> None:
    """Where the operator would compute something else (bfloat16 queries under autocast, attention dropout in train
    mode) or lose something (gradients: it has no backward), the forward is GPT2Attention's own."""
    from kernel_helpers import KernelCalls

    model, fused = models
    ids = torch.randint(0, model.config.vocab_size, (1, 6))

    def cached(m: GPT2LMHeadModel) -> torch.Tensor:
        torch.manual_seed(0)  # the same dropout draws for both models
        cache = KVCache.for_model(m, 1, 16)
        m(ids[:, :4], cache=cache)
        return m(ids[:, 4:], cache=cache)

    with KernelCalls() as calls:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(cached(fused), cached(model))
        with torch.no_grad():
            model.train(), fused.train()
            try:
                assert torch.equal(cached(fused), cached(model))
            finally:
                model.eval(), fused.eval()
        fused(ids, cache=KVCache.for_model(fused, 1, 16)).sum().backward()  # gradients on: through c_attn as well
        assert fused.transformer.h[0].attn.c_attn.weight.grad is not None
        fused.zero_grad(set_to_none=True)
    assert not calls.attention


def test_refused_in_one_line_without_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "load", lambda verbose=False: None)
    monkeypatch.setattr(kernels, "unavailable_reason", lambda: "disabled by TOYLLM_KERNELS=0")
    expected = "^fused cached attention needs toyllm's CPU kernel, which is unavailable: disabled by TOYLLM_KERNELS=0$"
    with pytest.raises(InvalidArgumentError, match=expected):
        use_cached_attention(GPT2LMHeadModel(GPT2Config.from_name("gpt2-tiny")))
