"""Checkpoints: a Hugging Face model directory plus `training_state.pt`, written so a crash never corrupts one.

    RUN_DIR/checkpoints/step-00000500/   config.json, model.safetensors, tokenizer files, training_state.pt
    RUN_DIR/latest -> checkpoints/step-00000500
    RUN_DIR/best   -> the checkpoint with the lowest validation loss

A checkpoint is written into a hidden `.step-...tmp-*` directory and renamed into place only when complete.
A rename within one filesystem is atomic, so a process killed mid-save leaves a stray temp directory (removed
by the next run) and the previous checkpoints untouched. `latest` and `best` are symlinks, replaced atomically
the same way. The model files are exactly what `transformers` and `toyllm generate` load.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

from toyllm.gpt2.model import GPT2LMHeadModel
from toyllm.train.errors import CheckpointError

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "training_state.pt"
STATE_VERSION = 1
_STEP_DIR = re.compile(r"step-(\d+)")


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINT_DIR / f"step-{step:08d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints (renamed into place, with a training state), oldest first."""
    root = run_dir / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.fullmatch(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def remove_partial_saves(run_dir: Path) -> None:
    """Delete temp directories left by a save that was killed."""
    root = run_dir / CHECKPOINT_DIR
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".") and ".tmp-" in p.name:
                shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: GPT2LMHeadModel,
    state: dict[str, Any],
    *,
    keep_last: int,
    is_best: bool = False,
) -> Path:
    """Write checkpoint `step` atomically, point `latest` (and `best`) at it, delete the oldest beyond `keep_last`."""
    final = checkpoint_dir(run_dir, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(staging)
        write_training_state(staging / STATE_FILE, {"version": STATE_VERSION, **state})
        if final.exists():  # the same step saved twice (e.g. a best checkpoint that is also the last step)
            shutil.rmtree(final)
        os.replace(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _point(run_dir / "latest", final)
    if is_best:
        _point(run_dir / "best", final)
    _rotate(run_dir, keep_last)
    return final


def write_training_state(path: Path, state: dict[str, Any]) -> None:
    """`torch.save`, then fsync, so that the rename that follows never publishes a file still in the page cache."""
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def load_training_state(directory: Path) -> dict[str, Any]:
    path = directory / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory} has no {STATE_FILE}: it is a model, not a training checkpoint to resume")
    try:
        state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, or not a torch file
        raise CheckpointError(f"{path} cannot be read ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise CheckpointError(f"{path} was written by an incompatible version of toyllm")
    # A file of the right version can still be damaged or hand-made: check what resuming reads, so it fails here
    # with one line instead of with a KeyError halfway through restoring.
    for key, kinds in _STATE_FIELDS.items():
        if not isinstance(state.get(key), kinds) or isinstance(state.get(key), bool):
            raise CheckpointError(f"{path} is damaged: its '{key}' is missing or of the wrong type")
    return state


_STATE_FIELDS: dict[str, type | tuple[type, ...]] = {
    "step": int,
    "tokens_seen": int,
    "best_val_loss": (int, float, type(None)),  # None: saved before the first evaluation
    "elapsed_s": (int, float),
    "config": dict,
    "optimizer": dict,
    "scheduler": dict,
    "scaler": dict,
    "sampler": dict,
    "rng": list,
}


def best_checkpoint(run_dir: Path) -> Path | None:
    link = run_dir / "best"
    return link.resolve() if link.is_symlink() and link.resolve().is_dir() else None


def _point(link: Path, target: Path) -> None:
    """Make `link` a relative symlink to `target`, atomically (a new link renamed over the old)."""
    tmp = link.with_name(f".{link.name}.tmp-{uuid.uuid4().hex[:8]}")
    os.symlink(os.path.relpath(target, link.parent), tmp)
    os.replace(tmp, link)


def _rotate(run_dir: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` checkpoints, and always the best one."""
    best = best_checkpoint(run_dir)
    found = list_checkpoints(run_dir)
    for old in found[: max(0, len(found) - keep_last)]:
        if best is None or old.resolve() != best:
            shutil.rmtree(old, ignore_errors=True)
