"""Hub ids, offline: a hand-built Hugging Face cache stands in for the Hub, which tests cannot reach.

The cache layout is the real one, `models--ORG--NAME/{blobs/<etag>, refs/main, snapshots/<commit>/<file>}`,
where each snapshot file is a relative symlink to its blob and a large file's etag is its sha256.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import huggingface_hub
import pytest
import safetensors.torch
import torch
from huggingface_hub.errors import GatedRepoError, RemoteEntryNotFoundError, RepositoryNotFoundError

from toyllm.errors import CheckpointError, HubUnavailableError, ModelNotFoundError
from toyllm.gpt2 import GPT2Config, GPT2LMHeadModel
from toyllm.gpt2 import weights as weights_module

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty HF cache, with offline mode on as `HF_HUB_OFFLINE=1 HF_HUB_CACHE=...` would set it.

    huggingface_hub reads those variables once, at import, so the module constants are patched as well.
    """
    path = tmp_path / "hub"
    path.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(path))
    return path


@pytest.fixture(scope="module")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, bytes], GPT2LMHeadModel]:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=16, n_positions=32, vocab_size=100, bos_token_id=99)
    model = GPT2LMHeadModel(config).eval()
    directory = tmp_path_factory.mktemp("model")
    model.save_pretrained(directory)
    files = {p.name: p.read_bytes() for p in directory.iterdir()}
    files["vocab.json"], files["merges.txt"] = b'{"a": 0}', b"#version: 0.2\n"
    return files, model


def add_to_cache(cache: Path, repo_id: str, files: dict[str, bytes]) -> Path:
    """Store files as `hf_hub_download` would have; return the snapshot directory."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    for sub in (repo / "blobs", repo / "refs", snapshot):
        sub.mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    for name, data in files.items():
        if name.endswith((".safetensors", ".bin")):  # LFS files: etag = sha256
            etag = hashlib.sha256(data).hexdigest()
        else:  # small files in git: etag = git's blob sha1
            etag = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        (repo / "blobs" / etag).write_bytes(data)
        (snapshot / name).symlink_to(Path("..", "..", "blobs", etag))
    return snapshot


def assert_same_logits(a: GPT2LMHeadModel, b: GPT2LMHeadModel) -> None:
    ids = torch.randint(0, a.config.vocab_size, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(a(ids), b(ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("repo_id", ["gpt2", "openai-community/gpt2"])
def test_loads_from_the_cache_offline(cache: Path, model_files: Any, repo_id: str) -> None:
    files, model = model_files
    snapshot = add_to_cache(cache, repo_id, files)
    loaded = GPT2LMHeadModel.from_pretrained(repo_id)  # the id goes to the Hub as given; `gpt2` is a real repo
    assert_same_logits(loaded, model)
    assert weights_module.resolve_checkpoint_dir(repo_id) == snapshot
    assert weights_module.download(repo_id) == snapshot


def test_gpt2_small_means_the_hubs_gpt2(cache: Path, model_files: Any) -> None:
    """The seed project's name for the 124M model is no Hub repo; it was sent to the Hub as is."""
    files, model = model_files
    add_to_cache(cache, "gpt2", files)
    assert_same_logits(GPT2LMHeadModel.from_pretrained("gpt2-small"), model)


def test_explicit_cache_dir(cache: Path, tmp_path: Path, model_files: Any) -> None:
    files, model = model_files
    other = tmp_path / "elsewhere"
    add_to_cache(other, "gpt2", files)
    assert_same_logits(weights_module.load_pretrained("gpt2", cache_dir=other), model)


def test_falls_back_to_pytorch_model_bin(cache: Path, model_files: Any) -> None:
    """Some repos only have the old pickle format; offline, whichever format is cached is used."""
    files, model = model_files
    buffer = io.BytesIO()
    torch.save(safetensors.torch.load(files["model.safetensors"]), buffer)
    without_safetensors = {k: v for k, v in files.items() if k != "model.safetensors"}
    add_to_cache(cache, "gpt2", {**without_safetensors, "pytorch_model.bin": buffer.getvalue()})
    assert_same_logits(GPT2LMHeadModel.from_pretrained("gpt2"), model)


def test_tokenizer_files_without_weights(cache: Path, model_files: Any) -> None:
    files, _ = model_files
    snapshot = add_to_cache(cache, "gpt2", {k: files[k] for k in ("config.json", "vocab.json", "merges.txt")})
    directory = weights_module.resolve_checkpoint_dir("gpt2")
    assert directory == snapshot and (directory / "vocab.json").read_bytes() == b'{"a": 0}'
    with pytest.raises(HubUnavailableError):  # the weights themselves are not there
        GPT2LMHeadModel.from_pretrained("gpt2")


def test_corrupt_blob_is_detected_and_deleted(cache: Path, model_files: Any) -> None:
    files, _ = model_files
    snapshot = add_to_cache(cache, "gpt2", files)
    link = snapshot / "model.safetensors"
    blob = link.resolve()
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF  # one flipped byte in a weight: the file still parses, the logits would be silently wrong
    blob.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt") as err:
        GPT2LMHeadModel.from_pretrained("gpt2")
    assert "\n" not in str(err.value) and "deleted" in str(err.value)
    assert not blob.exists() and not link.is_symlink()


def test_not_in_cache_offline_says_how_to_proceed(cache: Path) -> None:
    with pytest.raises(HubUnavailableError) as err:
        GPT2LMHeadModel.from_pretrained("openai-community/gpt2-medium")
    message = str(err.value)
    assert "\n" not in message
    for advice in ("local checkpoint directory", "offline mode is on", "where the Hub is reachable", "random:gpt2"):
        assert advice in message
    assert "set HF_HUB_OFFLINE=1" not in message  # it is already set: that advice would go round in a circle


def fake_response(status: int) -> Any:
    return SimpleNamespace(status_code=status, headers={}, request=None)


@pytest.mark.parametrize(
    ("error", "match"),
    [
        (RepositoryNotFoundError("404", response=fake_response(404)), "did you mean random:gpt2-tiny"),
        (GatedRepoError("403", response=fake_response(403)), "HF_TOKEN"),
        (ConnectionError("connection reset by peer"), "connection reset"),
    ],
)
def test_hub_errors_become_toyllm_errors(monkeypatch: pytest.MonkeyPatch, error: Exception, match: str) -> None:
    def fake_download(*args: Any, **kwargs: Any) -> str:
        raise error

    monkeypatch.setattr(weights_module, "hf_hub_download", fake_download)
    expected = HubUnavailableError if isinstance(error, ConnectionError) else ModelNotFoundError
    with pytest.raises(expected, match=match):
        GPT2LMHeadModel.from_pretrained("gpt2-tiny")


def test_repo_without_weights(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, model_files: Any) -> None:
    files, _ = model_files
    (tmp_path / "config.json").write_bytes(files["config.json"])

    def fake_download(repo_id: str, filename: str, **kwargs: Any) -> str:
        if filename == "config.json":
            return str(tmp_path / "config.json")
        raise RemoteEntryNotFoundError("404", response=fake_response(404))

    monkeypatch.setattr(weights_module, "hf_hub_download", fake_download)
    with pytest.raises(CheckpointError, match="neither model.safetensors nor pytorch_model.bin"):
        GPT2LMHeadModel.from_pretrained("someone/not-a-model")


def test_invalid_hub_id(cache: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="not a local directory"):
        GPT2LMHeadModel.from_pretrained("not a valid id!")


def test_unreachable_hub_fails_fast_and_uses_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model_files: Any
) -> None:
    """No HF_HUB_OFFLINE, but nothing listens at the endpoint: one failed connect, then the cache alone."""
    import socket
    import time

    with socket.socket() as s:  # a local port with nothing behind it: connections are refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = tmp_path / "hub"
    path.mkdir()
    for var in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(path))
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    weights_module._hub_reachable.cache_clear()
    try:
        start = time.perf_counter()
        with pytest.raises(HubUnavailableError, match="unreachable.*random:gpt2"):
            GPT2LMHeadModel.from_pretrained("org/not-cached")
        assert time.perf_counter() - start < 5  # huggingface_hub alone would retry for ~25 s
        files, model = model_files
        add_to_cache(path, "org/cached", files)
        loaded = GPT2LMHeadModel.from_pretrained("org/cached")
        torch.testing.assert_close(loaded.state_dict(), model.state_dict())
    finally:
        weights_module._hub_reachable.cache_clear()
