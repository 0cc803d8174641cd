"""A preallocated key/value cache, written at absolute positions.

Why preallocate: growing the cache with `torch.cat` at every step copies the whole cache each time (quadratic work)
and allocates on the hot path. Here every layer owns two buffers of shape (batch, heads, max_len, head_dim) made
once, and a step writes its keys and values into rows [length, length + T).

The fill level `length` is plain public state. `truncate(n)` moves it back, which is all that speculative decoding
needs to roll back rejected tokens: the stale rows are simply overwritten by the next write, and attention only ever
reads rows [0, length).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from toyllm.errors import InvalidArgumentError

if TYPE_CHECKING:
    from toyllm.gpt2.model import GPT2LMHeadModel


class KVCache:
    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_head: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (batch_size, n_head, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.max_len = max_len
        self.length = 0  # rows [0, length) hold valid keys/values for every layer

    @classmethod
    def for_model(cls, model: GPT2LMHeadModel, batch_size: int, max_len: int | None = None) -> KVCache:
        """A cache sized for `model` (a GPT2LMHeadModel or anything with `.config`), in its dtype and device."""
        cfg = model.config
        param = next(model.parameters())
        return cls(
            cfg.n_layer,
            batch_size,
            cfg.n_head,
            max_len if max_len is not None else cfg.n_positions,
            cfg.n_embd // cfg.n_head,
            dtype=param.dtype,
            device=param.device,
        )

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new keys/values (B, nh, T, hs) at rows [length, length+T); return rows [0, length+T).

        The model calls this once per layer during a forward pass and then calls `advance(T)` once at the end,
        so every layer writes at the same rows.
        """
        start = self.length
        end = start + k.shape[2]
        if end > self.max_len:
            raise InvalidArgumentError(f"KV cache overflow: need {end} positions, cache holds {self.max_len}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]  # (B, nh, end, hs) views, no copy

    def advance(self, n: int) -> None:
        self.length += n

    def truncate(self, n: int) -> None:
        """Forget everything from position n on (speculative rollback). Costs nothing: rows are overwritten later."""
        if not 0 <= n <= self.length:
            raise InvalidArgumentError(f"cannot truncate a cache of length {self.length} to {n}")
        self.length = n

    def reset(self) -> None:
        self.length = 0
