"""GPT-2: one model class for training, plain inference, KV-cache inference and speculative decoding.

Module names copy Hugging Face (`transformer.wte`, `transformer.h.N.attn.c_attn`, `transformer.ln_f`, `lm_head`),
so a Hub checkpoint loads with a key map and four transposes (see `toyllm/gpt2/weights.py`).

Shapes: B batch, T new tokens in this call, P tokens already in the cache, S = P + T keys, C = n_embd,
nh = n_head, hs = head size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from toyllm.errors import InvalidArgumentError
from toyllm.gpt2.config import GPT2Config
from toyllm.kv_cache import KVCache


class CausalLMOutput(NamedTuple):
    loss: torch.Tensor
    logits: torch.Tensor


def build_attention_mask(
    T: int, past: int, key_padding: torch.Tensor | None, device: torch.device, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor | None, bool]:
    """Return (attn_mask, is_causal) for SDPA.

    The causal mask is aligned bottom-right: query i sits at absolute position past + i and may see keys
    0..past + i. SDPA's `is_causal=True` aligns top-left, which is only right when past == 0, so we use it
    only then (it is also the fast path that selects flash attention on GPU).
    `key_padding` (B, S) is 1 for real tokens and 0 for left padding.

    The mask is additive (0 where a query may look, -inf where it may not), in the queries' `dtype`, and built once
    per forward. SDPA turns a bool mask into this form inside every call, so a bool mask is converted once per
    layer: on an H100, a 3-token forward of a 6-layer model over a cache cost 1.24 one-token forwards with the bool
    mask and 1.17 with a float one built once (docs/speculative_bench.md, tenth session).
    """
    S = past + T
    if key_padding is None:
        if past == 0:  # (a branch rather than `T > 1`: torch.compile may trace T as a symbol, SDPA wants a bool)
            return (None, True) if T > 1 else (None, False)
        if T == 1:
            return None, False  # one query at the end may see every key
        # -inf strictly above diagonal `past` (key j > past + i), 0 on and below it.
        return torch.full((T, S), float("-inf"), dtype=dtype, device=device).triu(diagonal=past + 1), False  # (T, S)
    causal = torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=past)  # (T, S)
    allowed = causal[None] & key_padding[:, None, :].bool()  # (B, T, S)
    # A padding query would see no key at all, and softmax over nothing is NaN. Let it see itself; its output is
    # never used.
    diag = torch.zeros(T, S, dtype=torch.bool, device=device)
    diag[torch.arange(T), past + torch.arange(T)] = True
    additive = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~(allowed | diag), float("-inf"))
    return additive[:, None], False  # (B, 1, T, S), broadcast over heads


def attention_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the attention's queries will have: autocast's if it is on (the linears then return it), else x's.

    Autocast leaves float64 alone, so a float64 model keeps float64 queries under it.
    """
    if x.dtype != torch.float64 and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class GPT2Attention(nn.Module):
    # Whether a cached forward without padding applies the causal mask by itself (toyllm/kernels/attention.py's fused
    # subclass does), so the model need not build one.
    masks_cache_itself = False

    def __init__(self, config: GPT2Config, layer_idx: int) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.layer_idx = layer_idx
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.attn_dropout = config.attn_pdrop
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def forward(
        self, x: torch.Tensor, cache: KVCache | None, mask: torch.Tensor | None, is_causal: bool
    ) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, nh, S, hs): cached keys followed by the new ones
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=self.attn_dropout if self.training else 0.0
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.c_proj(y))


class GPT2MLP(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.inner_dim)
        # GPT-2 uses the tanh approximation of GELU ("gelu_new" in Hugging Face). A module rather than a call, so that
        # an inference conversion can fuse it into c_fc's kernel (toyllm/kernels/amx.py) and leave an Identity here.
        self.act: nn.Module = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(config.inner_dim, config.n_embd)
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class GPT2Block(nn.Module):
    """Pre-LayerNorm residual block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPT2Config, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = GPT2Attention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = GPT2MLP(config)

    def forward(
        self, x: torch.Tensor, cache: KVCache | None, mask: torch.Tensor | None, is_causal: bool
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, mask, is_causal)
        return x + self.mlp(self.ln_2(x))


class GPT2Model(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)  # learned positions
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList(GPT2Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)


class GPT2LMHeadModel(nn.Module):
    """GPT-2 with its language-model head.

    `forward(input_ids, cache=None)` is the training path (and the readable reference for inference).
    Passing a `KVCache` makes the same code append this call's keys/values and attend over the whole cache.
    """

    def __init__(self, config: GPT2Config | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else GPT2Config()
        self.transformer = GPT2Model(self.config)
        self.lm_head = nn.Linear(self.config.n_embd, self.config.vocab_size, bias=False)
        self.gradient_checkpointing = False
        self.apply(self._init_weights)
        # GPT-2 scales the residual projections by 1/sqrt(2 * n_layer) so the residual stream's variance does
        # not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=self.config.initializer_range / math.sqrt(2 * self.config.n_layer))
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight  # one matrix for input and output embeddings
        # A restricted output vocabulary (`restrict_vocab`): the kept ids, (n,), and their rows of the head. A buffer
        # and a submodule, so that `.to(device)` moves them with the model; neither is saved (see weights.py).
        self.head_vocab: torch.Tensor | None
        self.register_buffer("head_vocab", None, persistent=False)
        self.head_subset: nn.Linear | None = None

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    # -- forward -------------------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: KVCache | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> Any:
        """Logits (B, T, vocab), or `CausalLMOutput(loss, logits)` when `labels` is given.

        input_ids: (B, T) new tokens. With a cache they follow the P tokens it already holds.
        position_ids: (B, T); defaults to P..P+T-1. Left-padded batches pass their own so padding takes no slot.
        attention_mask: (B, S) with 1 for real tokens and 0 for padding, over cached plus new tokens.
        labels: (B, T) as in Hugging Face: shifted inside, -100 is ignored.
        logits_to_keep: if > 0, only the last this many positions go through the (large) output projection.
        """
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if past + T > self.config.n_positions:
            raise ValueError(f"sequence of {past + T} tokens exceeds the context window of {self.config.n_positions}")
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device)[None]  # (1, T)
        x = self.transformer.wte(input_ids) + self.transformer.wpe(position_ids)  # (B, T, C)
        x = self.transformer.drop(x)
        if cache is not None and attention_mask is None and self._attention_masks_cache():
            mask, is_causal = None, False
        else:
            mask, is_causal = build_attention_mask(T, past, attention_mask, input_ids.device, attention_dtype(x))
        for block in self.transformer.h:
            if self.gradient_checkpointing and self.training and cache is None:
                # Recompute the block's activations in backward instead of storing them: less memory, ~1/3 more
                # compute.
                x = checkpoint(block, x, None, mask, is_causal, use_reentrant=False)
            else:
                x = block(x, cache, mask, is_causal)
        if cache is not None:
            cache.advance(T)
        x = self.transformer.ln_f(x)
        if logits_to_keep > 0:
            x = x[:, -logits_to_keep:]
        if self.head_subset is None:
            logits = self.lm_head(x)  # (B, T, vocab)
        else:
            if labels is not None:
                raise ValueError("a model with a restricted vocabulary is for inference; restrict_vocab(None) first")
            assert self.head_vocab is not None
            scores = self.head_subset(x)  # (B, T, n): logits of the kept tokens only
            logits = scores.new_full((*scores.shape[:-1], self.config.vocab_size), float("-inf"))  # (B, T, vocab)
            logits.index_copy_(-1, self.head_vocab, scores)
        if labels is None:
            return logits
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)).float(),  # (B*(T-1), vocab): predict token t+1 from t
            labels[:, 1:].reshape(-1),
            ignore_index=-100,
        )
        return CausalLMOutput(loss, logits)

    def _attention_masks_cache(self) -> bool:
        """Whether every block's attention masks a cached forward itself (toyllm/kernels/attention.py). Every one:
        converting a self-speculative draft converts only the target's first blocks, and the others need the mask."""
        return all(isinstance(b.attn, GPT2Attention) and b.attn.masks_cache_itself for b in self.transformer.h)

    # -- conveniences --------------------------------------------------------------------------------------------

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if self.head_subset is not None:
            n -= self.head_subset.weight.numel()  # a copy of rows already counted in lm_head
        if exclude_embeddings:
            n -= self.transformer.wpe.weight.numel()
        return n

    def restrict_vocab(self, token_ids: Sequence[int] | torch.Tensor | None) -> None:
        """Score only `token_ids`; every other token gets logit -inf, so it is never sampled. None undoes it.

        Why: a small model spends most of a decoding step in its vocab x n_embd output projection (for a 2-layer,
        128-wide GPT-2, 94% of its weights). A speculative *draft* only has to propose likely tokens, and
        speculative sampling stays exact whatever distribution the draft samples from, so a draft that cannot
        propose rare tokens only loses acceptance on them (FR-Spec, Zhao et al. 2025; EAGLE-3's draft vocabulary).
        Inference only: the kept rows are copied now, so later changes to the weights do not reach them, and a
        forward with labels raises.
        """
        if token_ids is None:
            self.head_vocab = self.head_subset = None
            return
        weight = self.lm_head.weight
        if not isinstance(self.lm_head, nn.Linear) or not weight.is_floating_point():
            raise ValueError("restrict_vocab needs a floating-point nn.Linear head: restrict before quantizing")
        ids = torch.as_tensor(token_ids, dtype=torch.long).flatten().unique()  # sorted, no repeats
        if ids.numel() == 0 or int(ids[0]) < 0 or int(ids[-1]) >= self.config.vocab_size:
            raise ValueError(f"token ids to keep must be a non-empty set within 0..{self.config.vocab_size - 1}")
        ids = ids.to(weight.device)
        head = nn.Linear(self.config.n_embd, ids.numel(), bias=False, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            head.weight.copy_(weight[ids])  # a copy of the kept rows
        head.requires_grad_(False)
        convert = getattr(type(self.lm_head), "from_linear", None)  # a kernel's Linear subclass: the copy is one too
        if convert is not None:
            head = convert(head)
        self.head_vocab, self.head_subset = ids, head

    def first_layers(self, n_layer: int) -> GPT2LMHeadModel:
        """A self-speculative draft: the first `n_layer` blocks, then the final norm and head.

        The returned model shares every parameter with this one (no copy): it is the same modules, listed again.
        """
        if not 1 <= n_layer <= self.config.n_layer:
            raise InvalidArgumentError(f"a self-speculative draft takes 1..{self.config.n_layer} layers, got {n_layer}")
        config = GPT2Config(**{**self.config.__dict__, "n_layer": n_layer})
        with torch.device("meta"):  # build the skeleton without allocating; every module is replaced below
            draft = GPT2LMHeadModel(config)
        for name in ("wte", "wpe", "drop", "ln_f"):
            setattr(draft.transformer, name, getattr(self.transformer, name))
        draft.transformer.h = nn.ModuleList(list(self.transformer.h)[:n_layer])
        draft.lm_head = self.lm_head
        draft.train(self.training)
        return draft

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> GPT2LMHeadModel:
        """Load a Hub id (`gpt2`, `openai-community/gpt2-medium`), a local HF directory, or `random:<preset>`."""
        from toyllm.gpt2.weights import load_pretrained

        return load_pretrained(name_or_path, device=device, dtype=dtype)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write `config.json` and `model.safetensors` that `transformers` loads with identical logits."""
        from toyllm.gpt2.weights import save_pretrained

        save_pretrained(self, directory)
