"""Load and save GPT-2 weights in the Hugging Face layout, so checkpoints move freely between toyllm and
`transformers`.

A name is resolved in this order:
  1. an existing local directory holding `config.json` and `model.safetensors` (or `pytorch_model.bin`);
  2. `random:<preset>`, a freshly initialised model (call `torch.manual_seed` first to make it repeatable);
  3. a Hugging Face Hub id (`gpt2`, `openai-community/gpt2-medium`), fetched with `huggingface_hub` so that its
     cache, `HF_HUB_OFFLINE`, `HF_TOKEN` and progress bars behave exactly as in every other Hugging Face tool.

Hugging Face's GPT-2 keeps its four projection matrices as `Conv1D` weights of shape (in, out), while our modules
are `nn.Linear`, which stores (out, in). That transpose, plus a `transformer.` prefix that the oldest checkpoints
omit, is the whole difference between the two layouts.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import pickle
import re
import shutil
import socket
import uuid
import weakref
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

import torch
from huggingface_hub import HfApi, constants, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors.torch import load_file, save_file

from toyllm.device import resolve_device, resolve_dtype
from toyllm.errors import CheckpointError, HubUnavailableError, InvalidArgumentError, ModelNotFoundError
from toyllm.gpt2.config import PRESET_ALIASES, PRESETS, GPT2Config
from toyllm.gpt2.model import GPT2LMHeadModel
from toyllm.tokenizer import standard_vocab_files

CONFIG_FILE = "config.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # in order of preference
TOKENIZER_FILES = ("vocab.json", "merges.txt")
# Hugging Face stores these as Conv1D weights, (in, out); nn.Linear wants (out, in).
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Both names mean the tanh approximation of GELU, which is what our MLP computes.
ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")
# Config flags that change the arithmetic; any other value would load without error and give wrong logits.
REQUIRED_FLAGS = {
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "reorder_and_upcast_attn": False,
    "add_cross_attention": False,
}
_SHA256 = re.compile(r"[0-9a-f]{64}")
# Where each loaded model came from, so that save_pretrained can carry its tokenizer files along.
_source_dirs: weakref.WeakKeyDictionary[GPT2LMHeadModel, Path] = weakref.WeakKeyDictionary()


# -- public API -----------------------------------------------------------------------------------------------


def load_pretrained(
    name_or_path: str | Path,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    *,
    cache_dir: str | Path | None = None,
) -> GPT2LMHeadModel:
    """A model in eval mode on `device` (CPU when None) in `dtype` (float32 when None).

    `cache_dir` overrides the Hugging Face cache (`HF_HUB_CACHE`) for Hub ids.
    """
    target_device = resolve_device(device if device is not None else "cpu")  # fail fast, before any download
    target_dtype = resolve_dtype(dtype) or torch.float32
    local = _local_dir(name_or_path)
    if local is None and str(name_or_path).startswith("random:"):
        # Initialise on the CPU, so that one seed gives the same weights whatever the device.
        model = GPT2LMHeadModel(GPT2Config.from_name(str(name_or_path).removeprefix("random:")))
    else:
        directory = local if local is not None else download(str(name_or_path), cache_dir=cache_dir)
        model = _load_dir(directory)
        _source_dirs[model] = directory
    return model.to(device=target_device, dtype=target_dtype).eval()


def resolve_checkpoint_dir(name_or_path: str | Path, *, cache_dir: str | Path | None = None) -> Path | None:
    """The directory where the tokenizer should look for `vocab.json` and `merges.txt`.

    A local directory is returned as is; a Hub id gives its snapshot in the HF cache, after fetching the config
    and those two files (not the weights); `random:<preset>` has no directory, hence None.
    """
    local = _local_dir(name_or_path)
    if local is not None:
        return local
    if str(name_or_path).startswith("random:"):
        return None
    return _fetch(str(name_or_path), cache_dir, with_weights=False)


def download(name: str, *, cache_dir: str | Path | None = None) -> Path:
    """Fetch (and verify) a Hub model ahead of time; return its snapshot directory in the HF cache."""
    local = _local_dir(name)
    if local is not None:
        return local  # nothing to fetch
    if name.startswith("random:"):
        raise InvalidArgumentError(f"'{name}' is made on the fly and has nothing to download")
    return _fetch(name, cache_dir, with_weights=True)


def save_pretrained(model: GPT2LMHeadModel, directory: str | Path) -> None:
    """Write a checkpoint that both toyllm and `transformers.GPT2LMHeadModel.from_pretrained` load.

    Everything is written into a hidden sibling directory first and moved into place at the end, so that a
    crash or Ctrl-C mid-save never leaves a half-written `model.safetensors` behind.
    """
    target = Path(directory).expanduser()
    if target.exists() and not target.is_dir():
        raise InvalidArgumentError(f"cannot save to {target}: it exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"  # same filesystem: rename is atomic
    staging.mkdir()
    try:
        _write_checkpoint(model, staging)
        if target.exists():  # keep the user's other files; replace ours one by one, each atomically
            for item in staging.iterdir():
                os.replace(item, target / item.name)
        else:
            os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# -- reading a local directory --------------------------------------------------------------------------------


def _local_dir(name_or_path: str | Path) -> Path | None:
    if str(name_or_path) == "":
        raise ModelNotFoundError("empty model name; pass a directory, random:<preset> or a Hub id such as gpt2")
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass the directory that holds config.json and the weights")
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or text.startswith((".", "/", "~")) or "\\" in text or text.count("/") > 1:
        raise ModelNotFoundError(f"no such checkpoint directory: {path}")
    return None


def _load_dir(directory: Path) -> GPT2LMHeadModel:
    config = _read_config(directory / CONFIG_FILE)
    weights = next((directory / name for name in WEIGHT_FILES if (directory / name).is_file()), None)
    if weights is None:
        sharded = " (sharded checkpoints are not supported)" if any(directory.glob("*.index.json")) else ""
        raise CheckpointError(f"{directory} has no {' or '.join(WEIGHT_FILES)}{sharded}")
    state = _from_hf(_read_tensors(weights), weights)
    stored_blocks = {k.split(".")[2] for k in state if k.startswith("transformer.h.")}
    if config.n_layer > len(stored_blocks):  # checked first: a damaged n_layer of 10**9 would hang the skeleton
        raise CheckpointError(
            f"{weights} holds {len(stored_blocks)} blocks but config.json says n_layer={config.n_layer}"
        )
    try:
        with torch.device("meta"):
            model = GPT2LMHeadModel(config)  # a skeleton: shapes, but no memory and no time spent on random init
    except (RuntimeError, TypeError, ValueError) as exc:  # sizes that pass the config checks but overflow torch
        raise CheckpointError(f"{directory / CONFIG_FILE} gives sizes torch cannot build: {_one_line(exc)}") from exc
    expected = {name: t.shape for name, t in model.state_dict().items()}
    tied = config.tie_word_embeddings
    if tied:  # GPT-2 reuses wte as its output projection; a stored lm_head.weight is a copy of it
        expected.pop("lm_head.weight")
        state.pop("lm_head.weight", None)
    problems = [f"missing {k}" for k in sorted(expected.keys() - state.keys())]
    problems += [f"unexpected {k}" for k in sorted(state.keys() - expected.keys())]
    for k in sorted(expected.keys() & state.keys()):
        if state[k].shape != expected[k] or not state[k].is_floating_point():
            problems.append(f"{k} is {state[k].dtype} {tuple(state[k].shape)}, expected {tuple(expected[k])}")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(f"{weights} does not fit its config.json: {'; '.join(problems[:3])}{more}")
    if tied:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    model.load_state_dict(state, assign=True)  # adopt the loaded tensors instead of copying into meta ones
    if tied:  # assign=True gave each name its own Parameter; make the two share one again
        model.lm_head.weight = model.transformer.wte.weight
    return model


def _read_config(path: Path) -> GPT2Config:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} should hold a JSON object")
    problems = []
    if data.get("model_type", "gpt2") != "gpt2":
        problems.append(f"model_type is '{data['model_type']}', not 'gpt2'")
    if data.get("activation_function", "gelu_new") not in ACTIVATIONS:
        problems.append(f"activation_function '{data['activation_function']}' is not one of {ACTIVATIONS}")
    problems += [f"{k}={data[k]}" for k, ok in REQUIRED_FLAGS.items() if data.get(k, ok) != ok]
    if problems:
        raise CheckpointError(f"{path} describes a model toyllm cannot run exactly: {'; '.join(problems)}")
    try:
        return GPT2Config.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: {exc}") from exc


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            tensors = load_file(path)
        else:
            # weights_only refuses to run code hidden in the pickle: a downloaded .bin is untrusted input.
            tensors = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # torch's message suggests weights_only=False, which toyllm never uses
        raise CheckpointError(
            f"cannot read {path}: it is not a plain file of tensors (damaged, or it holds other Python objects), and "
            "toyllm does not run code from a checkpoint; convert it to model.safetensors where it came from"
        ) from exc
    except Exception as exc:  # header, zip and pickle errors share no base class; some say no more than a number
        raise CheckpointError(f"cannot read {path}: {type(exc).__name__}: {_one_line(exc)}") from exc
    if not isinstance(tensors, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()
    ):
        raise CheckpointError(f"{path} does not hold a flat mapping from names to tensors")
    return dict(tensors)


def _from_hf(tensors: dict[str, torch.Tensor], source: Path) -> dict[str, torch.Tensor]:
    """Rename Hugging Face keys to ours and transpose the Conv1D weights."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        name = key.removeprefix("transformer.")
        if name.split(".")[-2:] in (["attn", "bias"], ["attn", "masked_bias"]):
            continue  # causal-mask buffers that old checkpoints saved; we build the mask on the fly
        name = name if name == "lm_head.weight" else f"transformer.{name}"
        if name.endswith(CONV1D_WEIGHTS) and tensor.dim() == 2:
            tensor = tensor.t().contiguous()  # (in, out) -> (out, in)
        if name in out:
            raise CheckpointError(f"{source} holds {name} twice, with and without the 'transformer.' prefix")
        out[name] = tensor
    return out


# -- writing --------------------------------------------------------------------------------------------------


def _write_checkpoint(model: GPT2LMHeadModel, out: Path) -> None:
    model = getattr(model, "_orig_mod", model)  # torch.compile wraps the model and prefixes its keys
    config = model.config.to_dict()
    # Both spellings, so transformers 4 (torch_dtype) and 5 (dtype) load the weights in the dtype they are in.
    config["dtype"] = config["torch_dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue  # the same matrix as wte; transformers re-ties it on load, as for the Hub's own files
        if name.startswith("head_subset."):
            continue  # a copy of some lm_head rows, for inference (restrict_vocab); the full head is saved
        if name.endswith(CONV1D_WEIGHTS):
            tensor = tensor.t()  # (out, in) -> (in, out)
        tensors[name] = tensor.detach().to("cpu").contiguous()
    save_file(tensors, str(out / WEIGHT_FILES[0]), metadata={"format": "pt"})
    umask = os.umask(0)  # (read it the only way there is: set it and put it back)
    os.umask(umask)
    os.chmod(out / WEIGHT_FILES[0], 0o666 & ~umask)  # safetensors writes through a private temporary file (0600)
    source = _source_dirs.get(model)
    if source is not None and all((source / name).is_file() for name in TOKENIZER_FILES):
        for name in TOKENIZER_FILES:
            shutil.copyfile(source / name, out / name)
    elif model.config.vocab_size == 50257:
        with contextlib.suppress(CheckpointError):  # no trusted vocabulary at hand: save the weights anyway
            for name, data in standard_vocab_files().items():
                (out / name).write_bytes(data)


# -- the Hugging Face Hub -------------------------------------------------------------------------------------


# Names people use for GPT-2 that are no Hub repo: the seed project's `gpt2-small` is the Hub's `gpt2`.
HUB_ALIASES = {"gpt2-small": "gpt2"}


def _fetch(repo_id: str, cache_dir: str | Path | None, with_weights: bool) -> Path:
    repo_id = HUB_ALIASES.get(repo_id, repo_id)
    config = _hub_file(repo_id, CONFIG_FILE, cache_dir)
    if config is None:
        raise CheckpointError(f"the Hub repo '{repo_id}' has no config.json; is it a GPT-2 model?")
    if with_weights:
        _fetch_weights(repo_id, cache_dir)
    for name in TOKENIZER_FILES:
        with contextlib.suppress(HubUnavailableError):  # the tokenizer falls back to the standard GPT-2 files
            _hub_file(repo_id, name, cache_dir)
    return config.parent  # snapshots/<commit>/


def _fetch_weights(repo_id: str, cache_dir: str | Path | None) -> Path:
    unavailable: HubUnavailableError | None = None
    for filename in WEIGHT_FILES:
        try:
            path = _hub_file(repo_id, filename, cache_dir)
        except HubUnavailableError as exc:
            unavailable = unavailable or exc  # the other format may still be in the cache
            continue
        if path is not None:
            _verify_sha256(path, repo_id, filename)
            return path
    if unavailable is not None:
        raise unavailable
    raise CheckpointError(f"the Hub repo '{repo_id}' has neither {' nor '.join(WEIGHT_FILES)}")


@functools.lru_cache(maxsize=1)
def _hub_reachable() -> bool:
    """One quick TCP connect to the Hub, once per process.

    Without it, huggingface_hub treats a machine with no network like a flaky connection and retries every file for
    about 25 seconds before giving up. When the Hub cannot be reached we go straight to the local cache instead,
    which is what HF_HUB_OFFLINE=1 does. Behind a proxy we cannot tell, so we let huggingface_hub try.
    """
    if constants.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=3).close()
    except OSError:
        return False
    return True


def _hub_file(repo_id: str, filename: str, cache_dir: str | Path | None) -> Path | None:
    """One file of a Hub repo from the HF cache, downloaded first if needed; None if the repo lacks it."""
    try:
        return Path(hf_hub_download(repo_id, filename, cache_dir=cache_dir, local_files_only=not _hub_reachable()))
    except GatedRepoError as exc:
        raise ModelNotFoundError(f"'{repo_id}' is gated on the Hub: accept its terms there and set HF_TOKEN") from exc
    except (RepositoryNotFoundError, RevisionNotFoundError, HFValidationError) as exc:
        hint = f"; did you mean random:{repo_id}?" if repo_id in PRESETS or repo_id in PRESET_ALIASES else ""
        raise ModelNotFoundError(
            f"'{repo_id}' is not a local directory, a random:<preset> name or a model on the Hugging Face Hub "
            f"(private models need HF_TOKEN){hint}"
        ) from exc
    except LocalEntryNotFoundError as exc:  # offline or unreachable, and not in the cache
        offline = constants.HF_HUB_OFFLINE
        reason = "offline mode is on (HF_HUB_OFFLINE=1)" if offline else "the Hub is unreachable"
        cache = "download it where the Hub is reachable" if offline else "set HF_HUB_OFFLINE=1 with a populated cache"
        raise HubUnavailableError(
            f"cannot get {filename} of '{repo_id}': {reason} and it is not in the Hugging Face cache; "
            f"use a local checkpoint directory, {cache}, or use random:gpt2"
        ) from exc
    except EntryNotFoundError:
        return None
    except Exception as exc:  # HTTP errors from the Hub, connections dropped mid-download
        raise HubUnavailableError(
            f"cannot download {filename} of '{repo_id}' ({type(exc).__name__}: {_one_line(exc)}); "
            "use a local checkpoint directory, set HF_HUB_OFFLINE=1 with a populated cache, or use random:gpt2"
        ) from exc


def _verify_sha256(path: Path, repo_id: str, filename: str) -> None:
    """Hash the weights against the Hub's LFS sha256, so a damaged cache fails loudly instead of giving garbage.

    The cache names each large blob after the sha256 that the Hub announced when it was downloaded, which lets us
    check offline too. Without symlinks (some Windows setups) the name is lost and we ask the Hub instead.
    """
    blob = path.resolve()
    expected = blob.name if _SHA256.fullmatch(blob.name) else _hub_sha256(repo_id, filename, path.parent.name)
    if expected is None:
        return  # nothing to compare against: offline without symlinks
    with blob.open("rb") as f:
        actual = hashlib.file_digest(f, "sha256").hexdigest()
    if actual != expected:
        path.unlink(missing_ok=True)  # the snapshot's symlink...
        blob.unlink(missing_ok=True)  # ...and the blob it points to, so that the next run downloads it afresh
        raise CheckpointError(
            f"{filename} of '{repo_id}' in the Hugging Face cache is corrupt (sha256 {actual[:12]}..., the Hub "
            f"says {expected[:12]}...); it has been deleted, run again to download it afresh"
        )


def _hub_sha256(repo_id: str, filename: str, commit: str) -> str | None:
    if constants.HF_HUB_OFFLINE:
        return None
    try:
        info = HfApi().get_paths_info(repo_id, [filename], revision=commit)
    except Exception:  # the file itself came through; a failed metadata call is no reason to refuse it
        return None
    lfs = getattr(info[0], "lfs", None) if info else None
    return lfs.sha256 if lfs is not None else None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
