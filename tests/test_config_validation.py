"""Bad config values and devices end as one clear error (exit code 2 in the CLI), never a crash inside torch."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from toyllm.cli.main import run_app
from toyllm.device import resolve_device
from toyllm.errors import InvalidArgumentError
from toyllm.gpt2 import GPT2Config, GPT2LMHeadModel
from toyllm.train.config import TrainConfig
from toyllm.train.trainer import build_model

SMALL: dict[str, Any] = dict(n_layer=1, n_head=2, n_embd=16, n_positions=32, vocab_size=100)


@pytest.mark.parametrize(
    "change",
    [
        {"vocab_size": 0},
        {"n_positions": "256"},
        {"n_embd": 16.0},
        {"n_layer": True},
        {"n_head": -2},
        {"n_inner": 0},
        {"resid_pdrop": 1.0},
        {"embd_pdrop": -0.1},
        {"attn_pdrop": math.nan},
        {"layer_norm_epsilon": math.inf},
        {"initializer_range": "0.02"},
        {"bos_token_id": -1},
        {"eos_token_id": 1.5},
        {"tie_word_embeddings": 1},
    ],
)
def test_bad_field_is_named(change: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgumentError, match=next(iter(change))):
        GPT2Config(**{**SMALL, **change})


def test_valid_edge_values_pass() -> None:
    """JSON may write 0 for 0.0; n_inner and the token ids may be null."""
    GPT2Config(**SMALL, n_inner=None, resid_pdrop=0, bos_token_id=None, eos_token_id=None)


def test_preset_override_that_does_not_divide() -> None:
    """What `toyllm train --model random:gpt2-tiny --n-head 3` builds: a one-line error, not a ValueError crash."""
    with pytest.raises(InvalidArgumentError, match="divisible by n_head"):
        build_model(TrainConfig(model="random:gpt2-tiny", n_head=3))


@pytest.mark.parametrize("preset", ["gpt2", "gpt2-medium", "gpt2-xl", "gpt2-tiny"])
@pytest.mark.parametrize("tied", [True, False])
def test_parameter_count_is_what_the_model_builds(preset: str, tied: bool) -> None:
    """The count the size guard reads, against the parameters a built model holds (gpt2-xl on the meta device)."""
    config = GPT2Config.from_name(preset, tie_word_embeddings=tied, n_inner=None if tied else 1000)
    with torch.device("meta"):
        model = GPT2LMHeadModel(config)
    assert config.parameter_count == sum(p.numel() for p in model.parameters())


def test_sizes_too_large_to_count_are_one_error() -> None:
    """A config.json with n_layer 10**400: formatting its parameter count overflowed a float."""
    with pytest.raises(InvalidArgumentError, match="n_layer must be a positive integer below 2\\*\\*63"):
        GPT2Config(**{**SMALL, "n_layer": 10**400})


def test_sample_tokens_beyond_what_generation_takes_is_refused_up_front() -> None:
    with pytest.raises(InvalidArgumentError, match="sample_tokens must be at most 10,000,000"):
        TrainConfig(data="d", sample_tokens=20_000_000).validate()


@pytest.mark.parametrize("change", [{"n_layer": 10**12}, {"n_layer": 120_000, "n_embd": 128}, {"n_embd": 2**40}])
def test_absurd_sizes_are_refused_before_anything_is_built(change: dict[str, Any]) -> None:
    """A mistyped size (--n-layer 120000) filled memory while building the model, then crashed."""
    with pytest.raises(InvalidArgumentError, match="parameters"):
        GPT2Config(**{**SMALL, "n_head": 1, **change})


def test_train_with_a_mistyped_layer_count_is_one_error() -> None:
    """What `toyllm train --model random:gpt2-tiny --n-layer 1000000000000` builds: nothing, one error."""
    with pytest.raises(InvalidArgumentError, match="parameters"):
        build_model(TrainConfig(model="random:gpt2-tiny", n_layer=10**12))


@pytest.mark.parametrize("change", [{"n_head": 0}, {"vocab_size": 50257.0}, {"n_layer": [2]}])
def test_generate_with_damaged_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], change: dict[str, Any]
) -> None:
    directory = tmp_path / "ckpt"
    GPT2LMHeadModel(GPT2Config(**SMALL)).save_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **change}))
    code = run_app(["generate", "Hi", "--model", str(directory)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and next(iter(change)) in lines[0] and "internal error" not in err, err


@pytest.mark.parametrize("name", ["meta", "mps", "xpu", "bogus", "CPU"])
def test_only_cpu_and_cuda_devices(name: str) -> None:
    with pytest.raises(InvalidArgumentError, match="choose auto, cpu, cuda or cuda:N"):
        resolve_device(name)


def test_cpu_device_and_passthrough() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("meta")) == torch.device("meta")  # Python callers may pass what they like


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_index_beyond_the_gpus() -> None:
    with pytest.raises(InvalidArgumentError, match="GPU"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_generate_on_meta_device(capsys: pytest.CaptureFixture[str]) -> None:
    code = run_app(["generate", "Hi", "--model", "random:gpt2-tiny", "--device", "meta"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "cuda:N" in err, err


@pytest.mark.parametrize("name", ["grad_accum", "batch_size", "eval_iters", "max_steps"])
def test_train_counts_past_int64_are_one_error(name: str) -> None:
    """`--grad-accum 100000000000000000000` ended in an OverflowError inside torch."""
    with pytest.raises(InvalidArgumentError, match=f"{name} must be below 2\\*\\*63"):
        TrainConfig(data="d", **{name: 10**20}).validate()


@pytest.mark.parametrize("value", [math.nan, math.inf, 0.0])
def test_peak_flops_must_be_finite_and_positive(value: float) -> None:
    """--peak-flops nan was accepted, and every MFU in the logs read NaN."""
    with pytest.raises(InvalidArgumentError, match="peak_flops must be a finite number > 0"):
        TrainConfig(data="d", peak_flops=value).validate()
