"""Shared pieces of the training tests: a small prepared corpus and a tiny, fast training config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from toyllm.train import TrainConfig, Trainer, TrainResult, prepare, train
from toyllm.train.checkpoint import latest_checkpoint

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


def full_and_resumed(data: Path, root: Path, **options: Any) -> tuple[TrainResult, TrainResult]:
    """The same run twice: uninterrupted in root/full, and in root/cut stopped at step 3 (just after the step-2
    checkpoint) and then resumed. Needs max_steps > 3 and eval_interval=2, so that step 2 is where it resumes."""
    full = train(tiny_config(data, root / "full", **options))

    def interrupt(trainer: Trainer, record: dict) -> None:
        if record["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(tiny_config(data, root / "cut", **options), callbacks=[interrupt]).fit()
    cut = latest_checkpoint(root / "cut")
    assert cut is not None and cut.name == "step-00000002"
    return full, train(tiny_config(data, root / "cut", resume=True, **options))
