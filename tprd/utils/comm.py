"""The process's place in a ``torch.distributed`` job, also when there is no job.

Without an initialised process group every function gives the single-process answer (world size
1, rank 0). The collective helpers (gather, reduce, barrier) and the launcher's local ranks live
in :mod:`tprd.engine.comm`, which re-exports these.
"""
from __future__ import annotations

import torch.distributed as dist

__all__ = ["is_dist_initialized", "get_world_size", "get_rank", "is_main_process"]


def is_dist_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0
