"""Start a (multi-process, multi-machine) job: one process per GPU, or per CPU worker.

``launch`` covers three cases:

* one process in total: ``main_func(*args)`` is called directly, no process group;
* started by ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` in the environment): the process
  group is initialised from the environment (``env://``) and ``main_func`` runs in this process;
* otherwise ``num_gpus_per_machine`` workers are started with ``torch.multiprocessing`` and each
  joins the group through ``dist_url`` (``"auto"``: a free TCP port on localhost, single machine).

The backend is NCCL when CUDA is available and gloo otherwise, so ``--num-gpus 2`` on a CPU-only
machine runs two gloo workers (useful for tests).
"""
from __future__ import annotations

import logging
import os
import socket
from datetime import timedelta
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from . import comm

__all__ = ["launch", "find_free_port", "DEFAULT_TIMEOUT"]

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = timedelta(minutes=30)

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def find_free_port() -> int:
    """A TCP port that was free on localhost a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def _started_by_torchrun() -> bool:
    return all(v in os.environ for v in _TORCHRUN_VARS)


def launch(
    main_func: Callable[..., Any],
    num_gpus_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: Optional[str] = "auto",
    args: Sequence[Any] = (),
    timeout: timedelta = DEFAULT_TIMEOUT,
) -> Any:
    """Run ``main_func(*args)`` on every process of the job.

    Args:
        main_func: the per-process entry point; must be picklable (a module-level function) when
            workers are spawned.
        num_gpus_per_machine: processes per machine (GPUs; on a CPU-only machine, gloo workers).
        num_machines, machine_rank: the number of machines and the index of this one.
        dist_url: ``"tcp://host:port"`` of machine 0, or ``"auto"`` (single machine only).
        args: positional arguments of ``main_func``.

    Returns ``main_func``'s result when it runs in this process (single process or torchrun);
    ``None`` after spawned workers finish.
    """
    if _started_by_torchrun():
        return _run_under_torchrun(main_func, args, timeout)

    num_gpus_per_machine = int(num_gpus_per_machine)
    num_machines = int(num_machines)
    if num_gpus_per_machine < 1 or num_machines < 1:
        raise ValueError(
            f"launch: --num-gpus ({num_gpus_per_machine}) and --num-machines ({num_machines}) must "
            "be at least 1."
        )
    world_size = num_machines * num_gpus_per_machine
    if world_size == 1:
        return main_func(*args)

    if torch.cuda.is_available() and num_gpus_per_machine > torch.cuda.device_count():
        raise ValueError(
            f"launch: --num-gpus {num_gpus_per_machine} but only {torch.cuda.device_count()} CUDA "
            "device(s) are visible (check CUDA_VISIBLE_DEVICES)."
        )
    if dist_url in (None, "", "auto"):
        if num_machines != 1:
            raise ValueError(
                "launch: dist_url='auto' only works on one machine; pass --dist-url "
                "tcp://<address of machine 0>:<port> to every machine."
            )
        dist_url = f"tcp://127.0.0.1:{find_free_port()}"
    if num_machines > 1 and dist_url.startswith("file://"):
        logger.warning("file:// init on several machines needs a file system shared by all of them.")

    mp.start_processes(
        _worker,
        nprocs=num_gpus_per_machine,
        args=(main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, tuple(args), timeout),
        daemon=False,
        start_method="spawn",
    )
    return None


def _set_device(local_rank: int) -> None:
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"Local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible)."
            )
        torch.cuda.set_device(local_rank)


def _worker(
    local_rank: int,
    main_func: Callable[..., Any],
    world_size: int,
    num_gpus_per_machine: int,
    machine_rank: int,
    dist_url: str,
    args: Sequence[Any],
    timeout: timedelta,
) -> None:
    global_rank = machine_rank * num_gpus_per_machine + local_rank
    # Expose the layout the same way torchrun does, for code that reads the environment.
    os.environ["LOCAL_RANK"] = str(local_rank)
    os.environ["LOCAL_WORLD_SIZE"] = str(num_gpus_per_machine)
    os.environ["RANK"] = str(global_rank)
    os.environ["WORLD_SIZE"] = str(world_size)
    _set_device(local_rank)
    try:
        dist.init_process_group(
            backend=_backend(),
            init_method=dist_url,
            world_size=world_size,
            rank=global_rank,
            timeout=timeout,
        )
    except Exception as e:
        raise RuntimeError(f"Process group initialisation failed for rank {global_rank} at {dist_url}: {e}") from e
    comm._set_local(local_rank, num_gpus_per_machine)
    try:
        comm.synchronize()
        main_func(*args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _run_under_torchrun(main_func: Callable[..., Any], args: Sequence[Any], timeout: timedelta) -> Any:
    local_rank = int(os.environ["LOCAL_RANK"])
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    _set_device(local_rank)
    owns_group = False
    if not dist.is_initialized():
        dist.init_process_group(backend=_backend(), init_method="env://", timeout=timeout)
        owns_group = True
    comm._set_local(local_rank, local_size)
    try:
        return main_func(*args)
    finally:
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()
