"""Small helpers around ``torch.distributed`` that also work when it is not initialised.

Every function degrades to the single-process answer (world size 1, rank 0, no-op barrier), so
code calling them runs unchanged in a plain ``python train_net.py`` process. The rank and world
size come from :mod:`tprd.utils.comm` (the low-level module the model and distillation code use).
"""
from __future__ import annotations

import os
from typing import Any, Dict, List

import torch
import torch.distributed as dist

from tprd.utils.comm import get_rank, get_world_size, is_dist_initialized, is_main_process

__all__ = [
    "is_dist_initialized",
    "get_world_size",
    "get_rank",
    "get_local_rank",
    "get_local_size",
    "is_main_process",
    "synchronize",
    "all_gather",
    "gather",
    "reduce_dict",
    "shared_random_seed",
]

# Set by :func:`tprd.engine.launch.launch` in each worker (the number of processes on this
# machine and the index of this one among them).
_LOCAL_RANK: int = 0
_LOCAL_SIZE: int = 1


def _set_local(rank: int, size: int) -> None:
    global _LOCAL_RANK, _LOCAL_SIZE
    _LOCAL_RANK, _LOCAL_SIZE = int(rank), int(size)


def get_local_rank() -> int:
    """Index of this process among the processes of its machine (the GPU it should use)."""
    if not is_dist_initialized():
        return 0
    if "LOCAL_RANK" in os.environ:
        return int(os.environ["LOCAL_RANK"])
    return _LOCAL_RANK


def get_local_size() -> int:
    if not is_dist_initialized():
        return 1
    if "LOCAL_WORLD_SIZE" in os.environ:
        return int(os.environ["LOCAL_WORLD_SIZE"])
    return _LOCAL_SIZE


def synchronize() -> None:
    """Barrier across all processes (no-op without a process group or with one process)."""
    if get_world_size() == 1:
        return
    if dist.get_backend() == dist.Backend.NCCL and torch.cuda.is_available():
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def all_gather(data: Any) -> List[Any]:
    """Gather a picklable object from every rank; returns the list ordered by rank."""
    world = get_world_size()
    if world == 1:
        return [data]
    out: List[Any] = [None] * world
    dist.all_gather_object(out, data)
    return out


def gather(data: Any, dst: int = 0) -> List[Any]:
    """Gather a picklable object on rank ``dst``; other ranks receive ``[]``."""
    world = get_world_size()
    if world == 1:
        return [data]
    if get_rank() == dst:
        out: List[Any] = [None] * world
        dist.gather_object(data, out, dst=dst)
        return out
    dist.gather_object(data, None, dst=dst)
    return []


def reduce_dict(input_dict: Dict[str, torch.Tensor], average: bool = True) -> Dict[str, torch.Tensor]:
    """All-reduce a dict of scalar tensors (same keys on every rank); averages by default.

    Keys are processed in sorted order so every rank stacks the values identically.
    """
    world = get_world_size()
    if world == 1 or not input_dict:
        return dict(input_dict)
    with torch.no_grad():
        names = sorted(input_dict.keys())
        values = torch.stack([input_dict[k].detach().reshape(()) for k in names]).float()
        dist.all_reduce(values)
        if average:
            values /= world
        return {k: v for k, v in zip(names, values)}


def shared_random_seed() -> int:
    """A random integer that is the same on every rank (rank 0 draws, all receive it)."""
    seed = int(torch.randint(2**31, (1,)).item())
    return all_gather(seed)[0]
