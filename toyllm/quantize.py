"""Weight-only int8 quantization: every Linear layer keeps its weights as int8 with one float scale per output row.

Why: decoding one token reads every weight once and does little arithmetic with it, so its speed is set by how many
bytes the weights take (docs/decoding_performance.md). int8 weights are a quarter of float32, so a kernel that reads
them directly can approach 4x fewer bytes per token. The activations stay in floating point ("weight-only"), which
keeps the accuracy cost small: the only error is rounding each weight to one of 255 levels of its row.

Per output channel (row) scales, symmetric around zero:

    scale[n] = max_k |W[n, k]| / 127,   q[n, k] = round(W[n, k] / scale[n]) in [-127, 127]
    y[..., n] = sum_k x[..., k] * q[n, k] * scale[n] + b[n] = (x @ q.T)[..., n] * scale[n] + b[n]

The scale factors out of the sum because it is constant along k, so the kernel multiplies once per output.

GPT-2 ties its output projection to the token embedding. The embedding is only gathered (one row per token), so it
stays in float; `lm_head` gets an int8 copy of the same matrix, which is the largest single matrix read per token.

Whether fewer bytes mean more speed depends on a kernel that reads them directly. torch's `_weight_int8pack_mm` has
one for AVX-512 CPUs and GPUs; on AVX2-only CPUs it falls back to slow code. There, once `toyllm.kernels.load()`
has built toyllm's own AVX2 kernel, `toyllm.kernels.use_cpu_kernels(model)` makes `Int8Linear` decode through it
instead (it widens int8 to float32 in registers).
For comparison, `pack_for_cpu` swaps in fbgemm's x86
kernels (the ones behind torch's dynamic quantization), to show what compact weights buy: `"fp16"` keeps
float16 weights and float32 activations (weight-only, 2 bytes per weight), and `"int8-dynamic"` uses the same int8
weights and scales but also rounds each input row to 8 bits on the fly (W8A8: not weight-only, so it costs more
accuracy, which `toyllm bench accuracy` measures). `"onednn"` changes no number at all: it stores the float32 weight
in oneDNN's blocked layout, whose matrix-vector kernel reads memory faster on CPUs.
"""

from __future__ import annotations

import warnings
from typing import Literal, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from toyllm import kernels

# torch's fused int8-weight matmul (reads int8, multiplies by the scale inside the kernel). Fast where torch has an
# optimised kernel for the CPU (AVX-512) or GPU; on AVX2-only CPUs it can be slower than float32, which the
# benchmark reports rather than hides.
HAS_INT8_MM = hasattr(torch.ops.aten, "_weight_int8pack_mm")
ModuleT = TypeVar("ModuleT", bound=nn.Module)


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale): q int8 (N, K), scale float32 (N,), such that q * scale[:, None] ~ weight."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # a zero row would otherwise divide by zero
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def int8_linear(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, cpu_kernel: bool = False
) -> torch.Tensor:
    """y = (x @ q.T) * scale + bias, for x (..., K), q int8 (N, K), scale (N,) in x's dtype.

    cpu_kernel: use toyllm's AVX2 kernel where it applies (it reads the int8 bytes only); see toyllm/kernels.
    """
    if cpu_kernel and kernels.usable(x, q):
        return kernels.gemv(x, q, bias, scale)
    if HAS_INT8_MM and x.device.type == "cpu":
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).contiguous(), q, scale)
        y = y.view(*x.shape[:-1], q.shape[0])
    else:  # dequantize on the fly: correct everywhere, but materialises a float copy of the weight per call
        y = F.linear(x, q.to(x.dtype)) * scale
    return y + bias if bias is not None else y


class Int8Linear(nn.Module):
    """A drop-in replacement for `nn.Linear` holding int8 weights (a buffer, not trainable) and per-row scales."""

    weight: torch.Tensor
    scale: torch.Tensor

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        # Kept in the activations' dtype, so `model.to(torch.bfloat16)` casts it along with everything else.
        self.register_buffer("scale", torch.ones(out_features, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None
        self.cpu_kernel = False  # set by toyllm.kernels.use_cpu_kernels

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        dtype, device = linear.weight.dtype, linear.weight.device
        module = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, dtype=dtype).to(device)
        q, scale = quantize_weight(linear.weight)
        module.weight.copy_(q)
        module.scale.copy_(scale)
        if linear.bias is not None and module.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.weight, self.scale, self.bias, self.cpu_kernel)

    def dequantize(self) -> torch.Tensor:
        """The float weight this layer computes with, (N, K): q * scale."""
        return self.weight.to(self.scale.dtype) * self.scale[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


@torch.no_grad()
def quantize_int8(model: ModuleT) -> ModuleT:
    """Replace every `nn.Linear` in `model` (in place) by an `Int8Linear`, lm_head included; return the model.

    A tied weight (GPT-2's lm_head shares the token embedding) is quantized as a copy, so the embedding table that
    the input side gathers from stays in full precision.
    """
    _refuse_amx(model, "quantize_int8")
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int8Linear.from_linear(child))
    return model


def _refuse_amx(model: nn.Module, what: str) -> None:
    """An AMX layer may carry the MLP's GELU (toyllm/kernels/amx.py): replacing it by another Linear would drop it."""
    from toyllm.errors import InvalidArgumentError
    from toyllm.kernels.amx import AmxLinear

    if any(isinstance(m, AmxLinear) for m in model.modules()):
        raise InvalidArgumentError(f"{what}: the model is already on AMX tiles; convert a model that is not")


PackedKind = Literal["onednn", "fp16", "int8-dynamic"]


def packed_kind_available(kind: PackedKind) -> bool:
    if kind == "onednn":
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    return "fbgemm" in torch.backends.quantized.supported_engines


class PackedLinear(nn.Module):
    """An `nn.Linear` whose weight is packed once for one CPU library's kernel (float32 in, float32 out).

    `onednn`: the float32 weight reordered into oneDNN's blocked layout, the one torch.compile's freezing pass uses
    on CPUs. Same numbers, same bytes, but its matrix-vector kernel uses every core where torch's default (MKL) one
    does not. `fp16` and `int8-dynamic`: fbgemm's kernels (see the module docstring).
    The packed weight is an opaque object, not a tensor: `packed_bytes` says how much memory it holds.
    """

    def __init__(self, linear: nn.Linear, kind: PackedKind) -> None:
        super().__init__()
        self.kind = kind
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float().cpu()
        bias = linear.bias.detach().float().cpu() if linear.bias is not None else None
        self.bias = bias
        if kind == "onednn":
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)  # 1: tuned for one row at a time
            self.packed_bytes = 4 * weight.numel()
        elif kind == "fp16":
            self.packed = torch.ops.quantized.linear_prepack_fp16(weight, bias)
            self.packed_bytes = 2 * weight.numel()
        else:
            q, scale = quantize_weight(weight)
            zero_points = torch.zeros(q.shape[0], dtype=torch.long)
            with warnings.catch_warnings():  # torch announces the quantized tensor API's move to torchao
                warnings.simplefilter("ignore")
                qweight = torch._make_per_channel_quantized_tensor(q, scale.double(), zero_points, 0)
            self.packed = torch.ops.quantized.linear_prepack(qweight, bias)
            self.packed_bytes = q.numel() + 4 * scale.numel()
        self.packed_bytes += 4 * bias.numel() if bias is not None else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "onednn":
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        x2 = x.reshape(-1, self.in_features)
        if self.kind == "fp16":
            y = torch.ops.quantized.linear_dynamic_fp16(x2, self.packed)
        else:  # reduce_range: 7-bit activations, so fbgemm's 8-bit multiply-adds cannot saturate
            y = torch.ops.quantized.linear_dynamic(x2, self.packed, True)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kind={self.kind}"


@torch.no_grad()
def pack_for_cpu(model: ModuleT, kind: PackedKind) -> ModuleT:
    """Replace every `nn.Linear` (lm_head included) by a `PackedLinear` of `kind`; float32 CPU models only."""
    param = next(model.parameters())
    if not packed_kind_available(kind) or param.device.type != "cpu" or param.dtype != torch.float32:
        raise ValueError(f"{kind} layers need a float32 model on a CPU whose torch has that library")
    _refuse_amx(model, "pack_for_cpu")
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, PackedLinear(child, kind))
    return model
