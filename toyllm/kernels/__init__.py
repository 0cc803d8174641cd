"""toyllm's own CPU matrix-vector kernel (gemv.cpp), compiled on first use, and the Linear layer that calls it.

Why a hand-written kernel: a decode step is one matrix-vector product per weight matrix, bound by how fast the
weights stream from memory. On AVX2 CPUs torch's 1-row product (MKL) uses one core and about half the machine's
read bandwidth, its bfloat16 path has no native arithmetic to use, and its int8-weight kernel is scalar code. gemv.cpp
spreads the rows over every thread, widens bfloat16 or int8 weights to float32 in registers, and reads each weight
once for up to 32 activation rows (speculative verification scores K+1 rows per sequence). docs/decoding_performance.md
has the measurements.

The kernel is built with torch's C++ extension tooling the first time it is asked for (about a minute with two cores;
it needs a C++ compiler), then loaded from torch's extension cache (`TORCH_EXTENSIONS_DIR`, default
~/.cache/torch_extensions) in a fraction of a second. Where it cannot be built (no compiler, not x86 with AVX2, or
`TOYLLM_KERNELS=0`), `load()` returns None, says why in `unavailable_reason()`, and every caller falls back to torch.
Only inference uses it: it has no backward, so tensors that need gradients always take torch's path.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

# Rows of x up to which the kernel beats torch's GEMM here: decode (1 row per sequence), speculative verification
# (K+1 rows, B x (K+1) for a batch), small batches and short prefills. Longer prefills go to MKL/oneDNN.
MAX_ROWS = 32

_SOURCE = Path(__file__).with_name("gemv.cpp")
_MORE_SOURCES = (  # built into the same module
    Path(__file__).with_name("amx.cpp"),  # AMX tiles (toyllm/kernels/amx.py)
    Path(__file__).with_name("argmax.cpp"),  # the greedy token on every thread (toyllm/sampling.py `greedy`)
    Path(__file__).with_name("attention.cpp"),  # attention over a KV cache in one call (toyllm/kernels/attention.py)
)
_state: dict[str, Any] = {}
ModuleT = TypeVar("ModuleT", bound=nn.Module)


def _why_not_supported() -> str | None:
    if os.environ.get("TOYLLM_KERNELS", "1") == "0":
        return "disabled by TOYLLM_KERNELS=0"
    capability = torch.backends.cpu.get_cpu_capability()  # "DEFAULT", "AVX2", "AVX512", ...
    if not capability.startswith("AVX"):
        return f"this CPU has no AVX2 (torch reports {capability})"
    if sys.platform != "linux":
        return "the kernel is only built on Linux"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler}) to build it with"
    return None


def load(verbose: bool = False) -> Any | None:
    """The compiled extension module (building it on first use), or None where it cannot be had."""
    if "module" not in _state:
        _state["reason"] = _why_not_supported()
        _state["module"] = None
        if _state["reason"] is None:
            # Say something only if this takes a while: that is a compile (about a minute), not torch's cached build.
            note = threading.Timer(
                2.0, lambda: print("toyllm: compiling the CPU kernel (first use: about a minute)...", file=sys.stderr)
            )
            note.daemon = True
            if verbose:
                note.start()
            try:
                _state["module"] = _build("toyllm_gemv", _SOURCE, *_MORE_SOURCES)
                _register_fake()
            except Exception as exc:  # no compiler, no ninja, a compile error: fall back to torch, say why
                _state["reason"] = f"building gemv.cpp failed: {_first_line(exc)}"
            finally:
                note.cancel()
    return _state["module"]


def _build(name: str, *sources: Path) -> Any:
    """Compile and load gemv.cpp (and more sources) as the extension `name` (cached by torch under that name)."""
    from torch.utils.cpp_extension import load as load_extension

    return load_extension(
        name=name,
        sources=[str(source) for source in sources],
        extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"],
        extra_ldflags=["-fopenmp"],  # the same libgomp.so.1 torch already loaded: one thread pool
        verbose=False,
    )


def _first_line(exc: Exception) -> str:
    """A build error's first line (compiler output can run to pages), for a one-line message."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def load_baseline(source: str | Path) -> Callable[..., torch.Tensor]:
    """Build another version of gemv.cpp beside the current one and return its operator, for an A/B in one process.

    Why: on a shared 2-core machine two kernel versions timed in separate runs differ by as much as the noise, so a
    change is judged by timing both, interleaved, in the same process (`toyllm bench kernel --baseline FILE`). The
    file's operator is registered under the namespace `toyllm_baseline` instead of `toyllm`, so both can be loaded.
    Raises a one-line `InvalidArgumentError` for a missing or unsuitable file or a failed build.
    """
    import hashlib
    import tempfile

    from toyllm.errors import InvalidArgumentError

    require("a baseline kernel")
    path = Path(source)
    if not path.is_file():
        raise InvalidArgumentError(f"no kernel source at {path}")
    text = path.read_text(errors="replace")
    if "TORCH_LIBRARY(toyllm," not in text or "TORCH_LIBRARY_IMPL(toyllm," not in text:
        raise InvalidArgumentError(f"{path} does not register the toyllm::gemv operator: is it a gemv.cpp?")
    text = text.replace("TORCH_LIBRARY(toyllm,", "TORCH_LIBRARY(toyllm_baseline,")
    text = text.replace("TORCH_LIBRARY_IMPL(toyllm,", "TORCH_LIBRARY_IMPL(toyllm_baseline,")
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    if _state.get("baseline", digest) != digest:
        raise InvalidArgumentError("a different baseline kernel is already loaded in this process")
    if "baseline" not in _state:
        copy = Path(tempfile.gettempdir()) / f"toyllm_gemv_baseline_{digest}.cpp"  # same text, same path: cached build
        copy.write_text(text)
        try:
            _build(f"toyllm_gemv_baseline_{digest}", copy)
        except Exception as exc:
            raise InvalidArgumentError(f"building the baseline kernel {path} failed: {_first_line(exc)}") from None
        _state["baseline"] = digest
    return torch.ops.toyllm_baseline.gemv


def _register_fake() -> None:
    """The shape rule torch.compile needs to trace through the operator without running it."""

    @torch.library.register_fake("toyllm::gemv")
    def _(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.shape[0], weight.shape[0])

    @torch.library.register_fake("toyllm::amx_linear")
    def _(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor, n: int, gelu: bool = False) -> torch.Tensor:
        return x.new_empty(x.shape[0], n)

    @torch.library.register_fake("toyllm::cached_attention")
    def _(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, past: int) -> torch.Tensor:
        return qkv.new_empty(qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3)

    @torch.library.register_fake("toyllm::argmax_rows")
    def _(x: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.shape[0], dtype=torch.long)


def unavailable_reason() -> str | None:
    """Why `load()` returned None (None if it has not been called or succeeded)."""
    return _state.get("reason")


def is_loaded() -> bool:
    return _state.get("module") is not None


def _decode_call(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """CPU tensors, few rows, and no gradient to track: a product the kernel may take instead of F.linear."""
    return (
        x.device.type == "cpu"
        and weight.device.type == "cpu"
        and x.numel() // max(1, x.shape[-1]) <= MAX_ROWS
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    )


def usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `gemv` applies: a loaded kernel, a decode-sized CPU product, a weight format it reads."""
    return is_loaded() and _decode_call(x, weight) and weight.dtype in (torch.float32, torch.bfloat16, torch.int8)


_EMPTY = torch.empty(0)


def gemv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """y = x @ weight.T * scale + bias in x's dtype, for x (..., K) and weight (N, K); call only when `usable`.

    Accumulates in float32 whatever the storage dtypes, like torch's own bfloat16 CPU matmul.
    """
    x2 = x.reshape(-1, x.shape[-1]).float().contiguous()  # (M, K)
    s = scale.float().contiguous() if scale is not None else _EMPTY
    b = bias.float().contiguous() if bias is not None else _EMPTY
    y = torch.ops.toyllm.gemv(x2, weight.contiguous(), s, b)  # (M, N) float32
    return y.to(x.dtype).view(*x.shape[:-1], weight.shape[0])


class GemvLinear(nn.Linear):
    """An `nn.Linear` (same parameters, same state dict) that decodes through the kernel when it applies.

    Training, products of more than MAX_ROWS rows (long prefills) and non-CPU devices go through `F.linear` as
    before; the two paths agree to float32 rounding (a different summation order).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        # Float32 all round: call the operator directly, without `gemv`'s conversions. This runs once per Linear per
        # decode step, and for a small draft model the Python around the kernel costs more than the kernel itself.
        if (
            x.dtype == torch.float32
            and w.dtype == torch.float32
            and w.is_contiguous()
            and (self.bias is None or (self.bias.dtype == torch.float32 and self.bias.is_contiguous()))
            and is_loaded()
            and _decode_call(x, w)
        ):
            bias = self.bias if self.bias is not None else _EMPTY
            y = torch.ops.toyllm.gemv(x.reshape(-1, x.shape[-1]).contiguous(), w, _EMPTY, bias)  # (M, N)
            return y.view(*x.shape[:-1], w.shape[0])
        if usable(x, w):  # other dtypes (bfloat16 weights, ...): the general wrapper converts
            return gemv(x, w, self.bias)
        return F.linear(x, w, self.bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> GemvLinear:
        return sharing_linear(cls, linear)


LinearT = TypeVar("LinearT", bound=nn.Linear)


def sharing_linear(cls: type[LinearT], linear: nn.Linear) -> LinearT:
    """A `cls` (an nn.Linear subclass) holding `linear`'s own Parameter objects, none allocated: tied weights
    (GPT-2's lm_head and wte) stay tied. What the kernels' `from_linear` constructors share."""
    layer = cls.__new__(cls)
    nn.Module.__init__(layer)
    layer.in_features, layer.out_features = linear.in_features, linear.out_features
    layer.weight = linear.weight
    layer.bias = linear.bias
    return layer


def require(purpose: str) -> Any:
    """The loaded module, or a one-line `InvalidArgumentError` saying what needed it and why it is unavailable."""
    from toyllm.errors import InvalidArgumentError

    module = load(verbose=True)
    if module is None:
        raise InvalidArgumentError(f"{purpose} needs toyllm's CPU kernel, which is unavailable: {unavailable_reason()}")
    return module


def enable(purpose: str, *models: nn.Module) -> None:
    """For the switches that ask for the kernel explicitly: CPU models only, the kernel required, then swapped in."""
    from toyllm.errors import InvalidArgumentError

    if any(next(m.parameters()).device.type != "cpu" for m in models):
        raise InvalidArgumentError(f"{purpose} runs toyllm's CPU kernel: use --device cpu")
    require(purpose)
    for model in models:  # a self-speculative draft shares the target's layers: they are swapped once
        use_cpu_kernels(model)


@torch.no_grad()
def use_cpu_kernels(model: ModuleT, verbose: bool = False) -> ModuleT:
    """Route every `nn.Linear` and `Int8Linear` of `model` (in place) through the kernel, and its cached attention
    through the fused operator (toyllm/kernels/attention.py).

    Also moves the large weights into 2 MB huge pages where Linux allows (toyllm/hugepages.py): the kernel streams
    them every step, and with fewer page walks a pass took 0.80 to 0.96 of the time in the A/Bs of
    `toyllm bench kernel --huge-pages`.
    Returns the model. Builds the kernel if needed; where it cannot be had, the model is left as it was and
    `unavailable_reason()` says why, so callers can report it rather than silently measure something else.
    """
    from toyllm.hugepages import use_huge_pages
    from toyllm.quantize import Int8Linear  # (quantize imports this module)

    if load(verbose=verbose) is None:
        return model
    use_huge_pages(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, GemvLinear.from_linear(child))
            elif isinstance(child, Int8Linear):
                child.cpu_kernel = True
    from toyllm.kernels.attention import use_cached_attention  # (it imports this module)

    return use_cached_attention(model)
