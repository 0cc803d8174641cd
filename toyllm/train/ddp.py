"""Distributed data parallel (DDP) helpers: the same script runs alone or under `torchrun`.

`torchrun --nproc_per_node N` starts N copies of the command and tells each, through environment variables, its
RANK (0..N-1 over all nodes), LOCAL_RANK (its GPU on this node) and WORLD_SIZE. Each copy holds a full model;
`DistributedDataParallel` averages the gradients across copies during `backward`, so they all take the same
optimizer step and stay identical. The backend is NCCL between GPUs and gloo between CPU processes.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from toyllm.device import resolve_device


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs, samples text and writes checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: str = "auto") -> DistContext:
    """Join the process group when started by torchrun; otherwise a single-process context on `device`."""
    if not launched_by_torchrun():
        return DistContext(device=resolve_device(device))
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    target = resolve_device(device)
    if target.type == "cuda":
        target = torch.device("cuda", local_rank)  # one GPU per process
        torch.cuda.set_device(target)
    backend = "nccl" if target.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return DistContext(rank=rank, local_rank=local_rank, world_size=world, device=target)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(value: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """The mean of `value` over ranks (a no-op alone). Used for logged losses, so every rank sees the same."""
    if not ctx.distributed:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / ctx.world_size


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()
