"""Process-group set-up for torchrun (one process per GPU), and the single-process fallback."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from odkd.device import select_device

__all__ = [
    "DistInfo",
    "all_reduce_sum",
    "backend_for",
    "barrier",
    "broadcast_buffers",
    "gather_to_main",
    "setup_distributed",
]

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def backend_for(use_cuda: bool, local_processes: int, gpus: int) -> str:
    """The process group's backend: NCCL when each of a node's processes has a GPU of its own; gloo on
    CPU, and when processes share a GPU (NCCL refuses two ranks on one device; gloo all-reduces CUDA
    tensors too, so DDP's correctness can still be checked on a one-GPU machine)."""
    return "nccl" if use_cuda and local_processes <= gpus else "gloo"


def setup_distributed(device: str | None = None) -> DistInfo:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1), else a single process.

    Device: ``cuda:<LOCAL_RANK mod GPUs>`` when CUDA is available, else CPU; ``device`` ("cuda" or "cpu")
    forces one (ValueError for "cuda" without a CUDA device: :func:`odkd.device.select_device`).
    Backend: :func:`backend_for`.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = select_device(device).type == "cuda"
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        target = torch.device("cuda", torch.cuda.current_device())
    else:
        target = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        dist.init_process_group(backend_for(use_cuda, local_processes, torch.cuda.device_count() if use_cuda else 0))
    return DistInfo(rank, world_size, local_rank, target)


def all_reduce_sum(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a small tensor over processes (identity for one process)."""
    if info.distributed:
        dist.all_reduce(values)
    return values


def broadcast_buffers(module: nn.Module, info: DistInfo) -> None:
    """The main process's buffers (BatchNorm statistics) into every process's ``module``. DDP keeps the
    weights equal, but each process's last forward pass updated its statistics with its own batch (DDP
    copies the main process's only at the next one): evaluated as they are, the processes would be
    scoring different models."""
    if info.distributed:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def gather_to_main(obj: T, info: DistInfo) -> list[T] | None:
    """Every process's picklable ``obj`` on the main process, in rank order, in one collective call
    (``[obj]`` for a single process); None on the other processes."""
    if not info.distributed:
        return [obj]
    gathered = [None] * info.world_size if info.is_main else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()
