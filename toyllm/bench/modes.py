"""The ways of generating that `toyllm bench` compares, all from the same weights.

    naive        no cache: every step recomputes the whole sequence (the readable reference)
    kv           the preallocated KV cache (toyllm/kv_cache.py)
    kv+compile   the same, with the model wrapped in torch.compile (also bf16+compile, gemv-int8+compile, ...)
    bf16         the KV path with weights and activations in bfloat16
    int8         the KV path with weight-only int8 Linear layers (toyllm/quantize.py)
    onednn       the KV path with float32 weights packed in oneDNN's layout (same numbers, faster kernel; CPU only)
    fp16w        the KV path with float16 weights read by fbgemm's x86 kernel, float32 activations (CPU only)
    int8-dyn     the KV path with fbgemm's int8 kernel: int8 weights, activations rounded to 8 bits (CPU only)
    gemv         the KV path with toyllm's own AVX2 matrix-vector kernel, float32 weights (toyllm/kernels; CPU only)
    gemv-bf16    bf16 with the same kernel reading bfloat16 weights (float32 accumulation; CPU only)
    gemv-int8    int8 with the same kernel reading the int8 weights (weight-only; CPU only)
    amx          the KV path with every Linear on AMX tiles in bfloat16 (toyllm/kernels/amx.py; Intel CPUs with AMX)
    speculative  the KV path plus a draft model (default: the target's first quarter of layers)
    hf           transformers' GPT2LMHeadModel.generate, greedy, with the same weights and dtype

Every mode decodes greedily and never stops early, so every run produces exactly `max_new_tokens` tokens and the
modes can be checked against each other token for token.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

import torch
from torch import nn

from toyllm import kernels
from toyllm.bench.runner import Mode, OnTokens
from toyllm.errors import InvalidArgumentError
from toyllm.generation import GenerationConfig, token_source
from toyllm.gpt2.model import GPT2LMHeadModel
from toyllm.kernels.amx import AmxLinear, use_amx
from toyllm.kv_cache import KVCache
from toyllm.quantize import PackedKind, PackedLinear, pack_for_cpu, quantize_int8

MODE_NAMES = (
    "naive",
    "kv",
    "kv+compile",
    "onednn",
    "bf16",
    "int8",
    "fp16w",
    "int8-dyn",
    "gemv",
    "gemv-bf16",
    "gemv-int8",
    "amx",
    "speculative",
    "hf",
)
# Modes that also come wrapped in torch.compile, as "<mode>+compile". The kernel's modes compile with it as one
# opaque operator (it is registered with torch.library), so compiling removes the Python and small-op overhead
# around it.
COMPILABLE = ("bf16", "int8", "gemv", "gemv-bf16", "gemv-int8")


def weight_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of every parameter and buffer, bytes a decode step reads), counting shared tensors once.

    A decode step reads every weight except the embedding tables, from which it only gathers one row per token.
    GPT-2's tied lm_head makes the token embedding count as read: the output projection multiplies by all of it.
    Packed layers hold opaque weights and say how many bytes those are in `packed_bytes`.
    """
    packed = 0
    everything: set[tuple[int, int]] = set()  # (start, end) byte addresses: shared or overlapping tensors count once
    streamed: set[tuple[int, int]] = set()
    for module in model.modules():
        if isinstance(module, PackedLinear):
            packed += module.packed_bytes
        unread = module.weight if isinstance(module, AmxLinear) else None  # it reads its bfloat16 copy, `packed`
        for t in chain(module.parameters(recurse=False), module.buffers(recurse=False)):
            span = (t.data_ptr(), t.data_ptr() + t.numel() * t.element_size())  # the tensor, not all its storage
            everything.add(span)
            if not isinstance(module, nn.Embedding) and t is not unread:
                streamed.add(span)
    return packed + _covered(everything), packed + _covered(streamed)


def _covered(spans: set[tuple[int, int]]) -> int:
    """Bytes covered by the union of [start, end) spans."""
    total, reach = 0, 0
    for start, end in sorted(spans):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)  # torch.compile's wrapper keeps the original module here


class ToyllmMode:
    """Our generation loop (`token_source`), with or without the cache, and with an optional draft model."""

    def __init__(
        self, name: str, model: GPT2LMHeadModel, use_kv_cache: bool = True, draft: GPT2LMHeadModel | None = None
    ) -> None:
        self.name = name
        self.model = model
        self.use_kv_cache = use_kv_cache
        self.draft = draft
        self.model_bytes, self.streamed_bytes = weight_bytes(_unwrap(model))
        if draft is not None:  # a self-speculative draft shares its weights: counted once in model_bytes
            self.model_bytes = weight_bytes(nn.ModuleList([_unwrap(model), draft]))[0]

    def run(self, input_ids: torch.Tensor, max_new_tokens: int, on_tokens: OnTokens) -> None:
        config = GenerationConfig(
            max_new_tokens=max_new_tokens, temperature=0.0, eos_token_id=None, use_kv_cache=self.use_kv_cache
        )
        for block in token_source(self.model, input_ids, config, draft_model=self.draft):
            on_tokens(block)

    def kv_cache_bytes(self, batch_size: int, total_len: int) -> int:
        """What `stream_tokens` preallocates: room for the prompt and every new token (up to the window)."""
        if not self.use_kv_cache:
            return 0
        models = [self.model] + ([self.draft] if self.draft is not None else [])
        return sum(_cache_bytes(m, batch_size, total_len) for m in models)


def _cache_bytes(model: GPT2LMHeadModel, batch_size: int, total_len: int) -> int:
    cfg = model.config
    dtype = next(model.parameters()).dtype
    max_len = min(cfg.n_positions, total_len)
    shape = (cfg.n_layer, batch_size, cfg.n_head, max_len, cfg.head_dim)
    return KVCache(*shape, dtype=dtype, device="meta").nbytes  # the class's own arithmetic, no memory


class HFMode:
    """transformers' `generate` on a `transformers.GPT2LMHeadModel` holding our weights, greedy, with its cache."""

    name = "hf"

    def __init__(self, model: GPT2LMHeadModel) -> None:
        self.hf = to_transformers(model)
        self.config = model.config
        self.dtype = next(model.parameters()).dtype
        self.model_bytes, self.streamed_bytes = weight_bytes(self.hf)

    def run(self, input_ids: torch.Tensor, max_new_tokens: int, on_tokens: OnTokens) -> None:
        from transformers.generation.streamers import BaseStreamer

        class Streamer(BaseStreamer):
            """generate() calls put() with the prompt first, then with each step's (B,) tokens."""

            def __init__(self) -> None:
                self.seen_prompt = False

            def put(self, value: torch.Tensor) -> None:
                if self.seen_prompt:
                    on_tokens(value.reshape(input_ids.shape[0], -1))
                self.seen_prompt = True

            def end(self) -> None:
                pass

        with torch.inference_mode():
            self.hf.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens,
                use_cache=True,
                pad_token_id=self.config.eos_token_id,
                streamer=Streamer(),
            )

    def kv_cache_bytes(self, batch_size: int, total_len: int) -> int:
        """transformers' DynamicCache grows by torch.cat and ends holding every position but the last token's."""
        cfg = self.config
        per_position = 2 * cfg.n_layer * batch_size * cfg.n_embd * self.dtype.itemsize
        return per_position * (min(cfg.n_positions, total_len) - 1)


def to_transformers(model: GPT2LMHeadModel) -> Any:
    """A `transformers.GPT2LMHeadModel` with exactly our weights (same dtype and device), in eval mode."""
    try:
        import transformers
    except ImportError as exc:
        raise InvalidArgumentError("the hf mode needs transformers: pip install transformers") from exc
    from toyllm.gpt2.weights import CONV1D_WEIGHTS

    transformers.logging.set_verbosity_error()  # no advice about generation configs in the middle of a table
    param = next(model.parameters())
    hf_config = transformers.GPT2Config.from_dict(model.config.to_dict())
    hf: Any
    with torch.device("meta"):  # no time spent on a random init that is overwritten next
        hf = transformers.GPT2LMHeadModel(hf_config)
    # HF keeps the four projection matrices as Conv1D weights, (in, out); ours are nn.Linear, (out, in).
    state = {k: (v.t() if k.endswith(CONV1D_WEIGHTS) else v) for k, v in model.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False, assign=True)
    if unexpected or any(not k.endswith("lm_head.weight") for k in missing):
        raise RuntimeError(f"weights do not map onto transformers' GPT-2: missing {missing}, unexpected {unexpected}")
    if model.config.tie_word_embeddings:
        hf.lm_head.weight = hf.transformer.wte.weight
    for name, buffer in hf.named_buffers():  # buffers that the state dict does not carry are still on meta
        if buffer.is_meta:
            raise RuntimeError(f"transformers' GPT-2 has a buffer {name} that toyllm does not provide")
    return hf.to(device=param.device, dtype=param.dtype).eval()


@dataclass
class ModeOptions:
    draft: GPT2LMHeadModel | None = None  # for speculative; None: the target's first n_layer // 4 layers
    compile_mode: str | None = None  # torch.compile's mode for kv+compile (None: the default)


def _compiled(model: GPT2LMHeadModel, options: ModeOptions) -> GPT2LMHeadModel:
    # Every compiled model in one process shares `forward`'s budget of recompilations (8 by default); each needs a
    # few (first call, then the cache length turns dynamic), so a run comparing several compiled modes would hit
    # the limit and silently measure eager code.
    limit = 16 * (1 + len(getattr(_compiled, "seen", ())))
    _compiled.seen = (*getattr(_compiled, "seen", ()), id(model))  # type: ignore[attr-defined]
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
    compiled: Any = torch.compile(model, mode=options.compile_mode)
    return compiled  # behaves as the model (attributes are forwarded to it)


def _packed(model: GPT2LMHeadModel, kind: PackedKind) -> GPT2LMHeadModel:
    try:
        return pack_for_cpu(copy.deepcopy(model), kind)
    except ValueError as exc:
        raise InvalidArgumentError(f"{exc} (use --device cpu --dtype float32)") from None


def _with_kernels(model: GPT2LMHeadModel) -> GPT2LMHeadModel:
    """`model` (a copy) decoding through toyllm's CPU kernel; a clear error where the kernel cannot be had."""
    kernels.enable("the gemv modes", model)
    return model


def _speculative(model: GPT2LMHeadModel, options: ModeOptions) -> Mode:
    draft = options.draft if options.draft is not None else model.first_layers(max(1, model.config.n_layer // 4))
    return ToyllmMode("speculative", model, draft=draft)


# Copies of the model with other number formats or weight layouts: the modes of the same name, and
# `toyllm bench accuracy`.
VARIANTS: dict[str, Callable[[GPT2LMHeadModel], GPT2LMHeadModel]] = {
    "bf16": lambda m: copy.deepcopy(m).to(torch.bfloat16),
    "int8": lambda m: quantize_int8(copy.deepcopy(m)),
    "onednn": lambda m: _packed(m, "onednn"),
    "fp16w": lambda m: _packed(m, "fp16"),
    "int8-dyn": lambda m: _packed(m, "int8-dynamic"),
    "gemv": lambda m: _with_kernels(copy.deepcopy(m)),
    "gemv-bf16": lambda m: _with_kernels(copy.deepcopy(m).to(torch.bfloat16)),
    "gemv-int8": lambda m: _with_kernels(quantize_int8(copy.deepcopy(m))),
    "amx": lambda m: use_amx(copy.deepcopy(m)),
}


def _variant(name: str) -> Callable[[GPT2LMHeadModel, ModeOptions], Mode]:
    return lambda m, o: ToyllmMode(name, VARIANTS[name](m))


BUILDERS: dict[str, Callable[[GPT2LMHeadModel, ModeOptions], Mode]] = {
    "naive": lambda m, o: ToyllmMode("naive", m, use_kv_cache=False),
    "kv": lambda m, o: ToyllmMode("kv", m),
    "kv+compile": lambda m, o: ToyllmMode("kv+compile", _compiled(m, o)),
    **{name: _variant(name) for name in VARIANTS},
    **{
        f"{name}+compile": (lambda n: lambda m, o: ToyllmMode(f"{n}+compile", _compiled(VARIANTS[n](m), o)))(name)
        for name in COMPILABLE
    },
    "speculative": _speculative,
    "hf": lambda m, o: HFMode(m),
}


def parse_modes(text: str | Sequence[str]) -> list[str]:
    """`"kv,hf"` or `["kv", "hf"]` -> checked names in the given order, without duplicates."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    unknown = [n for n in names if n not in BUILDERS]
    if unknown or not names:
        raise InvalidArgumentError(
            f"unknown mode(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(MODE_NAMES)}"
            f" (or {', '.join(COMPILABLE)} with +compile)"
        )
    return list(dict.fromkeys(names))


def build_modes(names: Sequence[str], model: GPT2LMHeadModel, options: ModeOptions | None = None) -> list[Mode]:
    """One `Mode` per name; bf16, int8 and hf make their own copy of the weights, the others share `model`."""
    options = options if options is not None else ModeOptions()
    return [BUILDERS[name](model, options) for name in parse_modes(names)]
