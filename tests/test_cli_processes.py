"""Every user error the core issue lists, each in its own `toyllm` process: exit code 2, one line, no traceback.

`test_cli.py` checks the messages in-process (fast); this file proves the real process boundary for each case,
since a traceback printed by the interpreter itself would only show up here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_cli import TINY, toyllm

from toyllm.gpt2 import GPT2Config, GPT2LMHeadModel


def saved_tiny(tmp_path: Path, damage: str) -> Path:
    torch.manual_seed(0)
    directory = tmp_path / "ckpt"
    GPT2LMHeadModel(GPT2Config.from_name("gpt2-tiny")).save_pretrained(directory)
    weights = directory / "model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "corrupt":
        weights.write_bytes(b"\x00garbage" * 100)
    elif damage == "missing":
        weights.unlink()
    return directory


CASES: dict[str, tuple[list[str], str]] = {
    "unknown preset": (["--model", "random:gpt2-huge"], "unknown preset"),
    "unknown local path": (["--model", "./no/such/checkpoint"], "no/such/checkpoint"),
    "temperature < 0": ([*TINY, "--temperature", "-1"], "temperature"),
    "top_p > 1": ([*TINY, "--top-p", "1.5"], "top_p"),
    "top_k < 0": ([*TINY, "--top-k", "-3"], "top_k"),
    "repetition_penalty <= 0": ([*TINY, "--repetition-penalty", "0"], "repetition_penalty"),
    "max_new_tokens < 1": ([*TINY, "--max-new-tokens", "0"], "max_new_tokens"),
    "cuda without cuda": ([*TINY, "--device", "cuda"], "CUDA"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_option_errors(case: str, tmp_path: Path) -> None:
    if case == "cuda without cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    options, fragment = CASES[case]
    toyllm("generate", "Hello", *options, tmp_path=tmp_path).assert_one_line_error(fragment)


@pytest.mark.parametrize("damage", ["truncated", "corrupt", "missing"])
def test_broken_checkpoints(damage: str, tmp_path: Path) -> None:
    directory = saved_tiny(tmp_path, damage)
    toyllm("generate", "Hello", "--model", str(directory), tmp_path=tmp_path).assert_one_line_error()


def test_empty_prompt(tmp_path: Path) -> None:
    toyllm("generate", "", *TINY, tmp_path=tmp_path).assert_one_line_error("empty")


def test_prompt_longer_than_the_context_without_window(tmp_path: Path) -> None:
    toyllm("generate", "hello " * 300, *TINY, "--no-window", tmp_path=tmp_path).assert_one_line_error("context window")
