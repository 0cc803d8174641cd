"""Model FLOPs utilisation (MFU): the share of the hardware's peak arithmetic that training turns into model math.

Training a transformer costs about 6 FLOPs per parameter per token (2 forward, 4 backward) plus the attention
scores, 12 * n_layer * n_embd * T per token (PaLM paper, appendix B). MFU counts only that model math: the
recomputation of gradient checkpointing is real work but not counted, which is why it lowers MFU. The peak is the
hardware's theoretical one (for a CPU, computed from its clock and vector width), so MFU is comparable across
machines; on a CPU shared with other programs it also drops when they take the cores.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from toyllm.gpt2.model import GPT2LMHeadModel

# Dense bf16/fp16 tensor-core peaks in FLOP/s, by a substring of the device name (first match wins).
GPU_PEAK_FLOPS = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("A10G", 125e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("4090", 165e12),
    ("3090", 71e12),
    ("V100", 125e12),
    ("T4", 65e12),
)


def flops_per_token(model: GPT2LMHeadModel, block_size: int) -> float:
    c = model.config
    n = model.num_parameters(exclude_embeddings=True)
    return 6.0 * n + 12.0 * c.n_layer * c.n_embd * block_size


def peak_flops(device: torch.device) -> float | None:
    """The device's peak FLOP/s: a table lookup for GPUs; for a CPU, cores x clock x FLOPs per cycle.

    None when unknown (an unlisted GPU, a CPU whose clock we cannot read): MFU is then left out of the logs.
    """
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((flops for key, flops in GPU_PEAK_FLOPS if key in name), None)
    if device.type == "cpu":
        return cpu_peak_flops()
    return None


def cpu_peak_flops() -> float | None:
    """fp32 peak of the threads torch uses: two fused multiply-adds per cycle on every SIMD lane.

    AVX-512 has 16 fp32 lanes, AVX2 8, plain SSE 4; an FMA counts as 2 FLOPs. Two FMA units per core is the
    common case (Intel since Haswell, AMD since Zen 2). Linux only (it reads /proc/cpuinfo); None elsewhere.
    """
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    mhz = re.search(r"^cpu MHz\s*:\s*([\d.]+)", info, re.MULTILINE)
    flags = re.search(r"^flags\s*:(.*)$", info, re.MULTILINE)
    if mhz is None or flags is None:
        return None
    names = set(flags.group(1).split())
    lanes = 16 if "avx512f" in names else 8 if "avx2" in names else 4
    fma_units = 2 if "fma" in names or lanes == 16 else 1
    per_cycle = lanes * 2 * fma_units
    return torch.get_num_threads() * float(mhz.group(1)) * 1e6 * per_cycle
