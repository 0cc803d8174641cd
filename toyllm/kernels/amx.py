"""Linear layers through AMX tiles (amx.cpp): bfloat16 products whose cost does not grow with the rows of x.

Why: a speculative round pays one target forward over K + 1 rows. With gemv.cpp those extra rows are extra
arithmetic, and on 2 CPU cores a 9-row forward costs 1.3x to 1.7x a one-row step; that ratio caps the measured
speedup below the formula's (docs/speculative.md). An AMX unit multiplies 16 rows as fast as one, so the weights'
stream is the whole cost, for 1 row or for 16, and bfloat16 weights halve that stream. Numerically this is bfloat16
autocast for the linear layers only: x and W rounded to bfloat16, products summed in float32; attention, LayerNorm
and the residual stream stay float32.

Intel Xeon CPUs from Sapphire Rapids on have AMX; elsewhere `amx_unavailable_reason()` says why not and callers
refuse with that one line. Products that need gradients (training) go through F.linear on the float32 weights;
the packed copy follows any in-place change to them.
"""

from __future__ import annotations

import os
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from toyllm import hugepages
from toyllm.kernels import ModuleT, load, sharing_linear

_EMPTY = torch.empty(0)


def amx_unavailable_reason() -> str | None:
    """None if AMX products can run here, else why not (one line)."""
    module = load()
    if module is None:
        from toyllm.kernels import unavailable_reason

        return f"toyllm's CPU kernel is unavailable: {unavailable_reason()}"
    if os.environ.get("TOYLLM_KERNEL_AMX") == "0":  # (amx.cpp reads it too)
        return "disabled by TOYLLM_KERNEL_AMX=0"
    if not torch.ops.toyllm.amx_ready():
        return "this CPU has no AMX-BF16 (an Intel Xeon from Sapphire Rapids on), or Linux refused it to this process"
    return None


def _require_amx() -> None:
    """Build or load the kernel; a one-line `InvalidArgumentError` where AMX products cannot run."""
    from toyllm.errors import InvalidArgumentError

    reason = amx_unavailable_reason()
    if reason is not None:
        raise InvalidArgumentError(f"AMX products need an Intel CPU with AMX: {reason}")


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """W (N, K) -> the tile layout amx.cpp streams: (N/16, K/32, 16, 16, 2) bfloat16, zero-padded.

    TDPBF16PS multiplies A (16 rows x 32 k) by B (32 k x 16 columns) with B stored as 16 rows of 16 column *pairs*:
    B's row r holds, for each output column n, the two inputs 2r and 2r + 1. So W is cut into 16-column by 32-input
    blocks, each laid out [k pair][column][2], and the blocks of one column strip follow each other in memory.
    """
    n, k = weight.shape
    n_pad, k_pad = -(-n // 16) * 16, -(-k // 32) * 32
    padded = torch.zeros(n_pad, k_pad, dtype=torch.bfloat16)
    padded[:n, :k] = weight.detach().to("cpu", torch.bfloat16)
    blocks = padded.view(n_pad // 16, 16, k_pad // 32, 16, 2)  # (column strip, column, k block, k pair, 2)
    return blocks.permute(0, 2, 3, 1, 4).contiguous()  # (column strip, k block, k pair, column, 2)


def unpack_weight(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The inverse of `pack_weight` (for tests and for reading the layout): (N, K) bfloat16."""
    strips, k_blocks = packed.shape[:2]
    rows = packed.permute(0, 3, 1, 2, 4).reshape(strips * 16, k_blocks * 32)  # (N padded, K padded)
    return rows[:n, :k]


class AmxLinear(nn.Linear):
    """An `nn.Linear` (same Parameters, same state dict) whose inference products run on AMX tiles in bfloat16.

    The packed copy is a non-persistent buffer: it is never saved, and the float32 `weight` stays the model's
    weight (training, and anything that needs gradients, goes through `F.linear` with it, in float32). The copy holds
    the bfloat16 bit patterns as int16, so that `model.to(dtype)` or `.half()` leave it alone, and it is taken again
    whenever the weight has changed since (an optimizer step, `load_state_dict`): torch counts every in-place write
    to a tensor in its `_version`.
    """

    packed: torch.Tensor
    gelu: bool  # GPT-2's tanh GELU applied to the output, in the kernel (the MLP's own `act` is then an Identity)

    @classmethod
    def from_linear(cls, linear: nn.Linear, gelu: bool = False) -> AmxLinear:
        """Shares `linear`'s Parameter objects, so tied weights (GPT-2's lm_head and wte) stay tied."""
        _require_amx()
        layer = sharing_linear(cls, linear)
        layer.gelu = gelu
        layer.register_buffer("packed", torch.empty(0, dtype=torch.int16), persistent=False)
        layer.repack()
        return layer

    def repack(self) -> None:
        """Take the packed copy of the weight as it is now (in 2 MB huge pages where it spans one and Linux allows:
        fewer page walks while it streams, as for gemv.cpp's weights; toyllm/hugepages.py)."""
        packed = pack_weight(self.weight).view(torch.int16)  # (N/16, K/32, 16, 16, 2)
        if packed.nbytes >= hugepages.HUGE_PAGE and hugepages.available():
            moved = hugepages.aligned_copy(packed)
            packed = moved if moved is not None else packed
        self.packed = packed
        self.packed_version = self.weight._version

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)):
            y = F.linear(x, self.weight, self.bias)
            return F.gelu(y, approximate="tanh") if self.gelu else y
        if x.shape[-1] != self.in_features:  # the kernel would zero-pad a narrower x, where F.linear refuses it
            raise ValueError(f"AmxLinear: x has {x.shape[-1]} features, the layer takes {self.in_features}")
        if self.weight._version != self.packed_version:
            self.repack()
        bias = self.bias if self.bias is not None else _EMPTY
        if x.dtype == torch.float32 and bias.dtype == torch.float32:
            # The usual case, with nothing to convert: this runs for every layer of every step, and for a small draft
            # the Python around the kernel is a visible share of the step.
            y = torch.ops.toyllm.amx_linear(x.reshape(-1, x.shape[-1]), self.packed, bias, self.out_features, self.gelu)
            return y.view(*x.shape[:-1], self.out_features)  # (..., N)
        x2 = x.reshape(-1, x.shape[-1]).float().contiguous()  # (M, K)
        y = torch.ops.toyllm.amx_linear(x2, self.packed, bias.float().contiguous(), self.out_features, self.gelu)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", gelu=tanh" if self.gelu else "")


# Every Linear converted so far, and what it became: a self-speculative draft made before the conversion holds the
# target's original head, and converting the draft must reuse the target's AmxLinear, not pack the head twice.
_converted: weakref.WeakKeyDictionary[nn.Linear, AmxLinear] = weakref.WeakKeyDictionary()


def use_amx(model: ModuleT) -> ModuleT:
    """Route every `nn.Linear` of `model` (in place) through AMX, and its cached attention through the fused kernel
    (toyllm/kernels/attention.py); returns the model.

    Raises a one-line `InvalidArgumentError` where AMX is unavailable. A self-speculative draft shares the target's
    layers and head: whichever model is converted first, each Linear is packed once.
    """
    from toyllm.errors import InvalidArgumentError
    from toyllm.gpt2.model import GPT2MLP
    from toyllm.kernels.attention import use_cached_attention

    _require_amx()
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise InvalidArgumentError("AMX products run on the CPU: use --device cpu")
    with torch.no_grad():
        for parent in list(model.modules()):
            # GPT-2's MLP: c_fc takes the GELU into the kernel (its output is then written once, already activated).
            act = parent.act if isinstance(parent, GPT2MLP) else None
            fuse = isinstance(act, nn.GELU) and act.approximate == "tanh" and type(parent.c_fc) is not AmxLinear
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear) and not isinstance(child, AmxLinear):
                    if child not in _converted:
                        _converted[child] = AmxLinear.from_linear(child, gelu=fuse and name == "c_fc")
                    setattr(parent, name, _converted[child])
            if fuse:
                parent.act = nn.Identity()
    return use_cached_attention(model)
