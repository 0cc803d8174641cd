"""Shared pieces of the training tests: a small prepared corpus and a tiny, fast training config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from toyllm.train import TrainConfig, prepare

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def prepared_shakespeare(directory: Path, chars: int = 100_000) -> Path:
    """The first `chars` characters of tinyshakespeare (about 30k tokens), prepared with a 10% validation split."""
    if not SHAKESPEARE.is_file():
        pytest.skip("tinyshakespeare.txt is not in ../shared/data")
    src = directory / "shakespeare.txt"
    src.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:chars], encoding="utf-8")
    return prepare([src], directory / "data", val_fraction=0.1).directory


def tiny_config(data: Path, out: Path, **overrides: Any) -> TrainConfig:
    """2 layers, 32 wide, 32-token windows: a step takes tens of milliseconds (the 50257-word head dominates)."""
    fields: dict[str, Any] = dict(
        data=str(data),
        out_dir=str(out),
        model="random:gpt2-tiny",
        n_layer=2,
        n_head=2,
        n_embd=32,
        block_size=32,
        batch_size=4,
        max_steps=6,
        eval_interval=3,
        eval_iters=2,
        warmup_steps=2,
        learning_rate=3e-3,
        sample_tokens=0,
        progress=False,
        tensorboard=False,
        peak_flops=1e12,  # skip the CPU matmul probe
    )
    fields.update(overrides)
    return TrainConfig(**fields)
