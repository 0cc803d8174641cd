"""Which tokens a vocabulary-restricted draft keeps (see `GPT2LMHeadModel.restrict_vocab`).

A draft that can only propose its n most frequent tokens loses acceptance exactly on the rarer ones, so the kept
set should be the n tokens the *target* writes most often. Two sources:

* a prepared data directory (`toyllm prepare`, or `toyllm distill`, whose text the target itself wrote): count
  its train.bin and keep the n most common ids;
* nothing: keep ids 0..n-1. GPT-2's ids follow its BPE merge order (the 256 bytes, then each merge in the order it
  was learned, most frequent pair first), so low ids are roughly the frequent ones on GPT-2's own training text.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from toyllm.errors import InvalidArgumentError


def frequent_tokens(tokens: np.ndarray | torch.Tensor, n: int, vocab_size: int, chunk: int = 1 << 24) -> torch.Tensor:
    """The ids of the `n` most common tokens in `tokens` (ties: lower id first), sorted; (min(n, vocab_size),).

    Counted `chunk` tokens at a time, so a memory-mapped corpus is never copied whole into memory.
    """
    flat = tokens.reshape(-1)
    counts = np.zeros(vocab_size, dtype=np.int64)
    for start in range(0, len(flat), chunk):
        piece = np.asarray(flat[start : start + chunk], dtype=np.int64)
        counts += np.bincount(piece, minlength=vocab_size)[:vocab_size]
    order = np.argsort(-counts, kind="stable")  # most common first; stable keeps lower ids first among ties
    return torch.from_numpy(np.sort(order[: min(n, vocab_size)]))


def draft_vocabulary(
    n: int, vocab_size: int, data: str | Path | None = None, always: tuple[int | None, ...] = ()
) -> torch.Tensor:
    """The ids a restricted draft keeps: the `n` most frequent in `data`'s train split, else ids 0..n-1.

    `always` (e.g. EOS) is added on top, so the draft can propose the end of the text: up to n + len(always) ids.
    None in it (a config without an EOS id) is skipped.
    """
    if not 1 <= n <= vocab_size:
        raise InvalidArgumentError(f"the draft vocabulary must keep 1..{vocab_size} tokens, got {n}")
    if data is None:
        ids = torch.arange(n)
    else:
        from toyllm.train.data import PreparedData  # (a data error there is already a clear one-line one)

        ids = frequent_tokens(PreparedData.open(data).train, n, vocab_size)
    extra = torch.tensor([i for i in always if i is not None and 0 <= i < vocab_size], dtype=torch.long)
    return torch.cat([ids, extra]).unique()
