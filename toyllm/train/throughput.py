"""Model FLOPs utilisation (MFU): the share of the hardware's peak arithmetic that training turns into model math.

Training a transformer costs about 6 FLOPs per parameter per token (2 forward, 4 backward) plus the attention
scores, 12 * n_layer * n_embd * T per token (PaLM paper, appendix B). MFU counts only that model math: the
recomputation of gradient checkpointing is real work but not counted, which is why it lowers MFU.
"""

from __future__ import annotations

import time

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
    """The device's peak FLOP/s: a table lookup for GPUs; for a CPU, a quick measurement of fp32 matmul speed.

    A CPU has no single published number, so "MFU" there means: compared with the fastest large matmul this
    machine just ran. None when unknown (an unlisted GPU): MFU is then left out of the logs.
    """
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((flops for key, flops in GPU_PEAK_FLOPS if key in name), None)
    if device.type == "cpu":
        return _measure_cpu_matmul()
    return None


def _measure_cpu_matmul(n: int = 1024, repeats: int = 4) -> float:
    g = torch.Generator().manual_seed(0)  # a private generator: measuring must not shift the training RNG
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best
