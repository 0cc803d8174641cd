"""Loading and saving checkpoints from local directories and `random:` presets, and every way that can fail."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from toyllm.errors import CheckpointError, InvalidArgumentError, ModelNotFoundError
from toyllm.gpt2 import GPT2Config, GPT2LMHeadModel
from toyllm.gpt2 import weights as weights_module

SMALL: dict[str, Any] = dict(
    n_layer=2, n_head=2, n_embd=16, n_positions=32, vocab_size=100, bos_token_id=99, eos_token_id=99
)
VOCAB_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
MERGES_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"


def small_model(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(**SMALL)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, GPT2LMHeadModel]:
    model = small_model()
    model.save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt", model


def assert_same_logits(a: GPT2LMHeadModel, b: GPT2LMHeadModel) -> None:
    ids = torch.randint(0, a.config.vocab_size, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(a(ids), b(ids), atol=1e-5, rtol=0)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- random presets --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["gpt2-tiny", "gpt2-mini"])
def test_random_preset_is_seedable(preset: str) -> None:
    torch.manual_seed(0)
    a = GPT2LMHeadModel.from_pretrained(f"random:{preset}")
    torch.manual_seed(0)
    b = GPT2LMHeadModel.from_pretrained(f"random:{preset}")
    assert a.config == GPT2Config.from_name(preset)
    assert not a.training and a.lm_head.weight is a.transformer.wte.weight
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_random_gpt2_has_the_published_size() -> None:
    model = GPT2LMHeadModel.from_pretrained("random:openai-community/gpt2")  # aliases work too
    assert model.num_parameters() == 124_439_808


def test_unknown_preset_lists_the_known_ones() -> None:
    with pytest.raises(ModelNotFoundError, match="gpt2-tiny") as err:
        GPT2LMHeadModel.from_pretrained("random:gpt5")
    assert "\n" not in str(err.value)


def test_random_dtype() -> None:
    model = GPT2LMHeadModel.from_pretrained("random:gpt2-tiny", dtype="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


# -- round trips and key styles --------------------------------------------------------------------------------


def test_round_trip(saved: tuple[Path, GPT2LMHeadModel]) -> None:
    directory, model = saved
    loaded = GPT2LMHeadModel.from_pretrained(directory)
    assert not loaded.training and loaded.config == model.config
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # still tied, not two copies
    assert all(p.requires_grad for p in loaded.parameters())  # ready to fine-tune
    assert_same_logits(loaded, model)


def test_saved_file_uses_the_hugging_face_layout(saved: tuple[Path, GPT2LMHeadModel]) -> None:
    directory, model = saved
    with safe_open(directory / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = set(f.keys())
        c_fc = f.get_tensor("transformer.h.0.mlp.c_fc.weight")
    assert "lm_head.weight" not in keys and all(k.startswith("transformer.") for k in keys)
    assert c_fc.shape == (16, 64)  # Conv1D: (in, out)
    config = json.loads((directory / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["n_embd"] == 16 and config["dtype"] == "float32"


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_old_key_style_without_prefix_and_with_mask_buffers(saved: tuple[Path, GPT2LMHeadModel], fmt: str) -> None:
    """The original openai-community/gpt2 files: no `transformer.` prefix, causal-mask buffers saved."""
    directory, model = saved
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(directory / "model.safetensors").items()}
    for i in range(model.config.n_layer):
        tensors[f"h.{i}.attn.bias"] = torch.ones(1, 1, 32, 32).tril()
        tensors[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    tensors["lm_head.weight"] = tensors["wte.weight"].clone()
    (directory / "model.safetensors").unlink()
    if fmt == "safetensors":
        save_file(tensors, directory / "model.safetensors")
    else:
        torch.save(tensors, directory / "pytorch_model.bin")
    assert_same_logits(GPT2LMHeadModel.from_pretrained(directory), model)


def test_checkpoint_dtype_is_cast(saved: tuple[Path, GPT2LMHeadModel]) -> None:
    directory, model = saved
    as_bf16 = GPT2LMHeadModel.from_pretrained(directory, dtype=torch.bfloat16)
    assert {p.dtype for p in as_bf16.parameters()} == {torch.bfloat16}
    assert as_bf16.lm_head.weight is as_bf16.transformer.wte.weight
    as_bf16.save_pretrained(directory)  # a bf16 file now ...
    with safe_open(directory / "model.safetensors", "pt") as f:
        assert f.get_tensor("transformer.wte.weight").dtype == torch.bfloat16
    assert json.loads((directory / "config.json").read_text())["dtype"] == "bfloat16"
    default = GPT2LMHeadModel.from_pretrained(directory)  # ... loads as float32 unless asked otherwise
    assert {p.dtype for p in default.parameters()} == {torch.float32}


# -- failures --------------------------------------------------------------------------------------------------


def raises_checkpoint_error(directory: Path, naming: str) -> str:
    with pytest.raises(CheckpointError) as err:
        GPT2LMHeadModel.from_pretrained(directory)
    message = str(err.value)
    assert naming in message and "\n" not in message, message
    return message


def test_truncated_safetensors(saved: tuple[Path, GPT2LMHeadModel]) -> None:
    directory, _ = saved
    path = directory / "model.safetensors"
    path.write_bytes(path.read_bytes()[:5000])
    raises_checkpoint_error(directory, "model.safetensors")


def test_garbage_safetensors_header(saved: tuple[Path, GPT2LMHeadModel]) -> None:
    directory, _ = saved
    (directory / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    raises_checkpoint_error(directory, "model.safetensors")


def test_corrupt_bin(saved: tuple[Path, GPT2LMHeadModel]) -> None:
    directory, model = saved
    (directory / "model.safetensors").unlink()
    torch.save(model.state_dict(), directory / "pytorch_model.bin")
    path = directory / "pytorch_model.bin"
    path.write_bytes(path.read_bytes()[:-300])
    raises_checkpoint_error(directory, "pytorch_model.bin")


class _Payload:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("this must never run",))


def test_bin_with_code_is_refused(saved: tuple[Path, GPT2LMHeadModel], capsys: pytest.CaptureFixture[str]) -> None:
    directory, _ = saved
    (directory / "model.safetensors").unlink()
    torch.save({"transformer.wte.weight": _Payload()}, directory / "pytorch_model.bin")
    message = raises_checkpoint_error(directory, "pytorch_model.bin")
    assert "must never run" not in capsys.readouterr().out
    # torch's own message advises weights_only=False, an option toyllm does not have and would not use
    assert "weights_only" not in message and "does not run code" in message


def test_corrupt_config(saved: tuple[Path, GPT2LMHeadModel]) -> None:
    directory, _ = saved
    (directory / "config.json").write_text('{"n_embd": 16,')
    raises_checkpoint_error(directory, "config.json")


def test_missing_config(saved: tuple[Path, GPT2LMHeadModel]) -> None:
    directory, _ = saved
    (directory / "config.json").unlink()
    raises_checkpoint_error(directory, "config.json")


def test_missing_weights(saved: tuple[Path, GPT2LMHeadModel]) -> None:
    directory, _ = saved
    (directory / "model.safetensors").unlink()
    raises_checkpoint_error(directory, "model.safetensors")


def test_wrong_shapes(saved: tuple[Path, GPT2LMHeadModel]) -> None:
    directory, _ = saved
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "n_embd": 32}))
    raises_checkpoint_error(directory, "expected (96, 32)")


def test_missing_and_unexpected_keys(saved: tuple[Path, GPT2LMHeadModel]) -> None:
    directory, _ = saved
    tensors = load_file(directory / "model.safetensors")
    tensors["transformer.h.7.ln_1.weight"] = tensors.pop("transformer.h.1.ln_1.weight")
    save_file(tensors, directory / "model.safetensors")
    message = raises_checkpoint_error(directory, "missing transformer.h.1.ln_1.weight")
    assert "unexpected transformer.h.7.ln_1.weight" in message


@pytest.mark.parametrize(
    "change",
    [
        {"model_type": "gpt_neo"},
        {"scale_attn_by_inverse_layer_idx": True},
        {"reorder_and_upcast_attn": True},
        {"scale_attn_weights": False},
        {"add_cross_attention": True},
        {"activation_function": "relu"},
    ],
)
def test_config_we_cannot_run_exactly(saved: tuple[Path, GPT2LMHeadModel], change: dict[str, object]) -> None:
    directory, _ = saved
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **change}))
    raises_checkpoint_error(directory, next(iter(change)))


@pytest.mark.parametrize(
    "change",
    [
        {"n_head": 0},
        {"n_head": -2},
        {"n_head": 3},
        {"n_positions": "256"},
        {"vocab_size": 100.0},
        {"n_inner": "x"},
        {"n_layer": [2]},
        {"n_embd": True},
        {"layer_norm_epsilon": "x"},
        {"layer_norm_epsilon": 0},
        {"attn_pdrop": 1.5},
        {"eos_token_id": "50256"},
        {"tie_word_embeddings": "false"},
        {"n_layer": 10**9},  # must fail at once, not build a billion-block skeleton
    ],
)
def test_damaged_config_values(saved: tuple[Path, GPT2LMHeadModel], change: dict[str, object]) -> None:
    """Wrong types or values in config.json are a CheckpointError naming the field, never a torch crash."""
    directory, _ = saved
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **change}))
    raises_checkpoint_error(directory, next(iter(change)))


def test_config_sizes_that_overflow_torch(saved: tuple[Path, GPT2LMHeadModel]) -> None:
    """Sizes torch could not build (2**62 wide overflowed its shape arithmetic) or too large to count are a
    CheckpointError naming the config, before any skeleton is made."""
    directory, _ = saved
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "n_embd": 2**62}))
    raises_checkpoint_error(directory, "refuses more than")
    (directory / "config.json").write_text(json.dumps({**config, "n_layer": 10**400}))
    raises_checkpoint_error(directory, "below 2**63")


def test_path_that_is_a_file_or_missing(saved: tuple[Path, GPT2LMHeadModel]) -> None:
    directory, _ = saved
    raises_checkpoint_error(directory / "config.json", "directory")
    with pytest.raises(ModelNotFoundError, match="no such checkpoint directory"):
        GPT2LMHeadModel.from_pretrained(directory / "nope")
    with pytest.raises(ModelNotFoundError, match="no such checkpoint directory"):
        GPT2LMHeadModel.from_pretrained("./definitely-not-here")


# -- saving ----------------------------------------------------------------------------------------------------


def _failing_save_file(tensors: dict[str, torch.Tensor], filename: str, metadata: dict[str, str]) -> None:
    Path(filename).write_bytes(b"half a file")
    raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-write


def test_interrupted_save_leaves_no_trace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(weights_module, "save_file", _failing_save_file)
    with pytest.raises(KeyboardInterrupt):
        small_model().save_pretrained(tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_interrupted_save_keeps_the_old_checkpoint(
    saved: tuple[Path, GPT2LMHeadModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    directory, model = saved
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    monkeypatch.setattr(weights_module, "save_file", _failing_save_file)
    with pytest.raises(KeyboardInterrupt):
        small_model(seed=1).save_pretrained(directory)
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before
    assert [p.name for p in directory.parent.iterdir()] == [directory.name]  # no staging dir left over
    assert_same_logits(GPT2LMHeadModel.from_pretrained(directory), model)


def test_save_over_existing_directory_keeps_other_files(saved: tuple[Path, GPT2LMHeadModel]) -> None:
    directory, _ = saved
    (directory / "README.md").write_text("notes")
    newer = small_model(seed=1)
    newer.save_pretrained(directory)
    assert (directory / "README.md").read_text() == "notes"
    assert_same_logits(GPT2LMHeadModel.from_pretrained(directory), newer)


def test_saved_files_follow_the_umask(saved: tuple[Path, GPT2LMHeadModel]) -> None:
    """The weights came out readable by their owner only (safetensors writes a private temporary file), unlike the
    other files of the same checkpoint."""
    directory, _ = saved
    umask = os.umask(0)
    os.umask(umask)
    for name in ("config.json", "model.safetensors"):
        assert (directory / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_save_to_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(InvalidArgumentError):
        small_model().save_pretrained(tmp_path / "file")


def test_standard_tokenizer_files_go_along(tmp_path: Path) -> None:
    GPT2LMHeadModel.from_pretrained("random:gpt2-tiny").save_pretrained(tmp_path / "tiny")
    assert sha256(tmp_path / "tiny" / "vocab.json") == VOCAB_SHA256
    assert sha256(tmp_path / "tiny" / "merges.txt") == MERGES_SHA256


def test_no_tokenizer_files_for_an_unknown_vocabulary(saved: tuple[Path, GPT2LMHeadModel]) -> None:
    directory, _ = saved  # vocab_size 100: the standard files would be wrong
    assert not (directory / "vocab.json").exists() and not (directory / "merges.txt").exists()


def test_tokenizer_files_of_the_source_directory_go_along(saved: tuple[Path, GPT2LMHeadModel]) -> None:
    directory, _ = saved
    (directory / "vocab.json").write_text('{"a": 0}')
    (directory / "merges.txt").write_text("#version: 0.2\n")
    GPT2LMHeadModel.from_pretrained(directory).save_pretrained(directory.parent / "copy")
    assert (directory.parent / "copy" / "vocab.json").read_text() == '{"a": 0}'
    assert (directory.parent / "copy" / "merges.txt").read_text() == "#version: 0.2\n"


def test_resolve_checkpoint_dir_for_local_and_random(saved: tuple[Path, GPT2LMHeadModel]) -> None:
    directory, _ = saved
    assert weights_module.resolve_checkpoint_dir(directory) == directory
    assert weights_module.resolve_checkpoint_dir(str(directory)) == directory
    assert weights_module.resolve_checkpoint_dir("random:gpt2") is None
    assert weights_module.download(str(directory)) == directory
    with pytest.raises(InvalidArgumentError):
        weights_module.download("random:gpt2")


def test_staging_directory_is_a_sibling(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The final move is only atomic within one filesystem, so staging must happen next to the target."""
    seen: list[str] = []
    real_replace = os.replace

    def spy(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        seen.append(str(Path(src).parent))
        real_replace(src, dst)

    monkeypatch.setattr(weights_module.os, "replace", spy)
    small_model().save_pretrained(tmp_path / "ckpt")
    assert seen == [str(tmp_path)]
