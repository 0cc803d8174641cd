"""What the numbers were measured on, and how fast this machine can read memory.

A benchmark result without its machine is meaningless, so every JSON and CSV file carries `describe_machine()`.
The read bandwidth is the ceiling of a memory-bound decoder: each decode step streams every weight once, so
tokens/s can never beat `bandwidth / bytes_per_step` (the roofline; see docs/decoding_performance.md).
"""

from __future__ import annotations

import os
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil
import torch

# CPU features that decide which kernels torch can use: AVX2/AVX-512 for fp32, AVX512_BF16/AMX for fast bf16,
# AVX512_VNNI/AVX_VNNI for fast int8 dot products.
INTERESTING_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def _cpu_info() -> tuple[str, list[str]]:
    """(model name, flags) from /proc/cpuinfo on Linux; elsewhere whatever `platform` knows, and no flags."""
    fallback = platform.processor() or platform.machine()
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return fallback, []
    fields: dict[str, str] = {}
    for line in text.splitlines():  # one block per logical CPU; the first one is enough
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields.get("model name", fallback), fields.get("flags", "").split()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def describe_machine(device: torch.device | str = "cpu") -> dict[str, Any]:
    """CPU model, cores, memory, torch/transformers versions, threads, GPU name, and the load when we started.

    The load average is recorded because a shared machine makes every absolute number slower; only ratios
    measured side by side in one run survive contention.
    """
    cpu, flags = _cpu_info()
    device = torch.device(device)
    info: dict[str, Any] = {
        "cpu_model": cpu,
        "cpu_logical_cores": os.cpu_count(),
        "cpu_physical_cores": psutil.cpu_count(logical=False),
        "cpu_flags": [f for f in INTERESTING_FLAGS if f in flags],
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "memory_gb": round(psutil.virtual_memory().total / 1e9, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "torch_threads": torch.get_num_threads(),
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "device": str(device),
        "gpu": None,
        "timestamp": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_gb"] = round(props.total_memory / 1e9, 1)
        info["cuda"] = torch.version.cuda
    return info


def measure_read_bandwidth(device: torch.device | str = "cpu", nbytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """Best-of-`repeats` read bandwidth in bytes/s: the time to sum a float32 tensor of `nbytes`.

    A sum reads every byte once and writes nothing, which is the access pattern of a decode step (every weight
    read once, tiny outputs). 0.5 GB is far larger than any cache, so this is DRAM (or HBM) bandwidth.
    """
    device = torch.device(device)
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    best = float("inf")
    for i in range(repeats + 1):
        _sync(device)
        start = time.perf_counter()
        x.sum()
        _sync(device)
        if i > 0:  # the first pass warms up the page tables and the kernel
            best = min(best, time.perf_counter() - start)
    return x.numel() * x.element_size() / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
