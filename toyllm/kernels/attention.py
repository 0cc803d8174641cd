"""Attention over a KV cache in one operator (attention.cpp), for decoding on the CPU.

Why: a decode step's attention is little arithmetic wrapped in many small operators: c_attn's output split into q, k
and v, three views and transposes, two writes into the cache, a causal mask for the new rows, SDPA, and a transpose
and copy back. On 2 CPU cores, replacing them made a 6-layer, 384-wide model's step about a sixth shorter and a
2-layer draft's about a quarter (a scratch A/B), and a verification of K + 1 rows paid more for them than a
one-token step did.
`toyllm::cached_attention` does all of it in one call: it writes the new keys and values at rows [P, P + T) of the
cache and attends each new query to keys 0 .. its own position, the bottom-right causal mask, without building one.

Each query's arithmetic depends on its own position alone (queries are grouped only to share loads), so a row comes
out the same bit for bit whether it is decoded alone or verified among K + 1 rows: speculative greedy output stays
equal to plain greedy output. Against SDPA it differs by float32 rounding (about 1e-7 on unit-scale inputs).

Only the case it was made for goes through it: inference (no gradients, eval mode) on the CPU in float32, with a
cache, no padding, and at most `MAX_NEW_TOKENS` new tokens (decode steps, speculative verifications, short
prompts). A long prompt takes SDPA, whose blocked kernels were faster there (a 1000-token prefill of gpt2 took 330 ms
with this operator against 251 ms with SDPA, in a scratch timing on a 2-core Xeon). So do a left-padded batch, a
model in another dtype or under autocast, and anything that needs gradients: `GPT2Attention`'s own path. A
verification of more than `MAX_NEW_TOKENS` tokens (K > 31) therefore computes its rows with SDPA, and its greedy
output is then not guaranteed equal to plain decoding's bit for bit.
"""

from __future__ import annotations

import torch

from toyllm.gpt2.model import GPT2Attention, attention_dtype, build_attention_mask
from toyllm.kernels import ModuleT
from toyllm.kv_cache import KVCache

# New tokens per forward up to which the operator is used: decode (1), a verification of K + 1 <= 32 tokens.
MAX_NEW_TOKENS = 32


class CachedAttention(GPT2Attention):
    """`GPT2Attention` (same parameters, same state dict) whose cached forward is `toyllm::cached_attention`."""

    # The model then builds no causal mask for a cached forward without padding. The fallback below builds its own,
    # once per layer; for a long prompt that is nothing next to its attention.
    masks_cache_itself = True

    def forward(
        self, x: torch.Tensor, cache: KVCache | None, mask: torch.Tensor | None, is_causal: bool
    ) -> torch.Tensor:
        if cache is None or mask is not None:  # training, or a padded batch: its mask came from the model
            return super().forward(x, cache, mask, is_causal)
        B, T, C = x.shape
        k_cache, v_cache = cache.k[self.layer_idx], cache.v[self.layer_idx]
        if (
            T <= MAX_NEW_TOKENS
            and x.device.type == "cpu"
            and attention_dtype(x) == k_cache.dtype == v_cache.dtype == torch.float32  # (autocast: not float32)
            and not torch.is_grad_enabled()  # the operator has no backward
            and not self.training  # nor attention dropout
            and k_cache.shape[1] == self.n_head  # a cache of another head split: let cache.update refuse it
            and k_cache.is_contiguous()
            and v_cache.is_contiguous()
            and cache.length + T <= cache.max_len  # (else cache.update raises its usual error below)
        ):
            qkv = self.c_attn(x).contiguous()  # (B, T, 3C): q, k, v side by side
            y = torch.ops.toyllm.cached_attention(qkv, k_cache, v_cache, cache.length)  # (B, T, C)
            return self.resid_dropout(self.c_proj(y))
        mask, is_causal = build_attention_mask(T, cache.length, None, x.device, attention_dtype(x))
        return super().forward(x, cache, mask, is_causal)


def use_cached_attention(model: ModuleT) -> ModuleT:
    """Give every `GPT2Attention` of `model` the fused cached forward, in place; returns the model.

    The modules keep their identity (their class is swapped, nothing is copied), so a self-speculative draft, which
    lists the target's own blocks, gets it too. Raises a one-line `InvalidArgumentError` where toyllm's CPU kernel
    cannot be built.
    """
    from toyllm.kernels import require

    require("fused cached attention")
    for module in model.modules():
        if type(module) is GPT2Attention:
            module.__class__ = CachedAttention
    return model
