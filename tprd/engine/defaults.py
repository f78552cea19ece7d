"""Command line and per-run setup shared by every ``train_net.py``.

``default_argument_parser`` has detectron2's flags (``--config-file``, ``--resume``,
``--eval-only``, ``--num-gpus``, ``--num-machines``, ``--machine-rank``, ``--dist-url``) and takes
everything after them as dotted config overrides (``train.max_iter=100``).

``default_setup(cfg, args)`` prepares a run: output folder, logging (console + ``log.txt``),
environment report, seeding, ``config.yaml``, cudnn benchmark.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import platform
import random
import sys
from typing import Any, Optional

import numpy as np
import torch

from . import comm

__all__ = ["default_argument_parser", "default_setup", "user_errors_exit", "USER_ERRORS", "setup_logger", "seed_all_rng", "collect_env_info"]


def default_argument_parser(epilog: Optional[str] = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        epilog=epilog
        or (
            "Examples:\n"
            "  python projects/deformable_detr/train_net.py --config-file cfg.py --num-gpus 8\n"
            "  python projects/deformable_detr/train_net.py --config-file cfg.py --eval-only "
            "train.init_checkpoint=model.pth\n"
            "  python projects/deformable_detr/train_net.py --config-file cfg.py --resume "
            "train.output_dir=./output/run1\n"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config-file", default="", metavar="FILE", help="path to the config file")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="resume from the newest checkpoint of train.output_dir (model, optimizer, scheduler, "
        "iteration); without it train.init_checkpoint is loaded into the model only",
    )
    parser.add_argument(
        "--eval-only",
        action="store_true",
        help="only evaluate train.init_checkpoint (with --resume: the last checkpoint of "
        "train.output_dir); results go to <checkpoint dir>/eval_<checkpoint name>/ unless "
        "train.output_dir is given on the command line",
    )
    parser.add_argument("--num-gpus", type=int, default=1, help="processes per machine (GPUs)")
    parser.add_argument("--num-machines", type=int, default=1, help="total number of machines")
    parser.add_argument("--machine-rank", type=int, default=0, help="the rank of this machine (unique per machine)")
    parser.add_argument(
        "--dist-url",
        default="auto",
        help="initialisation URL for torch.distributed: 'auto' (a free port on localhost, one "
        "machine) or tcp://<address of machine 0>:<port>",
    )
    parser.add_argument(
        "opts",
        help="config overrides as path.key=value pairs at the end of the command, e.g. "
        "train.max_iter=1000 dataloader.train.total_batch_size=8",
        default=None,
        nargs=argparse.REMAINDER,
    )
    return parser


def _user_errors() -> tuple:
    from tprd.checkpoint import CheckpointFileError, CheckpointMismatchError
    from tprd.config import ConfigLoadError, ConfigOverrideError

    return (ConfigLoadError, ConfigOverrideError, CheckpointFileError, CheckpointMismatchError, FileNotFoundError)


#: Errors in what the user gave (config file, overrides, weight files): reported by
#: :func:`user_errors_exit` as a message, without a traceback.
USER_ERRORS = _user_errors()


@contextlib.contextmanager
def user_errors_exit(exit_code: int = 2):
    """Turn :data:`USER_ERRORS` raised inside into ``error: <message>`` on stderr as the last line(s)
    of output and exit with ``exit_code``; other exceptions keep their traceback."""
    try:
        yield
    except USER_ERRORS as e:
        sys.stdout.flush()
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(exit_code) from None


def setup_logger(output: Optional[str] = None, distributed_rank: int = 0, name: str = "tprd") -> logging.Logger:
    """Log ``name`` (and ``fvcore``) to stdout on rank 0 and to ``output`` on every rank.

    ``output``: a folder (``<output>/log.txt``; other ranks ``log.txt.rank<r>``) or a ``.txt``/
    ``.log`` file. Calling it again for the same logger replaces its handlers.
    """
    fmt = logging.Formatter("[%(asctime)s %(name)s %(levelname)s] %(message)s", datefmt="%m/%d %H:%M:%S")
    loggers = [logging.getLogger(name), logging.getLogger("fvcore")]
    handlers = []
    if distributed_rank == 0:
        ch = logging.StreamHandler(stream=sys.stdout)
        ch.setLevel(logging.INFO)
        ch.setFormatter(fmt)
        handlers.append(ch)
    if output:
        filename = output if output.endswith((".txt", ".log")) else os.path.join(output, "log.txt")
        if distributed_rank > 0:
            filename = f"{filename}.rank{distributed_rank}"
        os.makedirs(os.path.dirname(os.path.abspath(filename)), exist_ok=True)
        fh = logging.FileHandler(filename, mode="a", encoding="utf-8")
        fh.setLevel(logging.DEBUG)
        fh.setFormatter(fmt)
        handlers.append(fh)
    for lg in loggers:
        for h in list(lg.handlers):
            if getattr(h, "_tprd_handler", False):
                lg.removeHandler(h)
                h.close()
        lg.setLevel(logging.DEBUG)
        lg.propagate = False
        for h in handlers:
            h._tprd_handler = True  # type: ignore[attr-defined]
            lg.addHandler(h)
    return loggers[0]


def seed_all_rng(seed: Optional[int] = None) -> int:
    """Seed python, numpy and torch; a negative or ``None`` seed draws a random one."""
    if seed is None or seed < 0:
        seed = int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    return seed


def collect_env_info() -> str:
    lines = [
        f"python: {sys.version.split()[0]} ({platform.platform()})",
        f"torch: {torch.__version__}",
        f"CUDA available: {torch.cuda.is_available()}",
    ]
    try:
        import torchvision

        lines.append(f"torchvision: {torchvision.__version__}")
    except ImportError:  # pragma: no cover
        pass
    if torch.cuda.is_available():
        lines.append(f"CUDA: {torch.version.cuda}, cuDNN: {torch.backends.cudnn.version()}")
        for i in range(torch.cuda.device_count()):
            lines.append(f"GPU {i}: {torch.cuda.get_device_name(i)}")
    lines.append(f"CPU threads: {torch.get_num_threads()}")
    return "\n".join(lines)


def _get(cfg: Any, dotted: str, default: Any = None) -> Any:
    node = cfg
    for part in dotted.split("."):
        try:
            node = node[part]
        except (KeyError, TypeError, AttributeError):
            try:
                node = getattr(node, part)
            except Exception:
                return default
        if node is None:
            return default
    return node


def default_setup(cfg: Any, args: Any) -> None:
    """Per-run setup on every process:

    1. create ``train.output_dir`` (main process);
    2. logging to the console (main process) and ``output_dir/log.txt``;
    3. log the environment, the command line and the config file;
    4. seed python/numpy/torch with ``train.seed + rank`` (a negative seed: random);
    5. save the full config as ``output_dir/config.yaml`` (main process);
    6. ``torch.backends.cudnn.benchmark = train.cudnn_benchmark`` (default False).
    """
    output_dir = _get(cfg, "train.output_dir")
    rank = comm.get_rank()
    if output_dir and comm.is_main_process():
        os.makedirs(output_dir, exist_ok=True)
    comm.synchronize()

    logger = setup_logger(output_dir, distributed_rank=rank, name="tprd")
    logger.info(f"Rank of current process: {rank}. World size: {comm.get_world_size()}")
    logger.info("Environment info:\n" + collect_env_info())
    logger.info("Command line arguments: " + str(args))
    config_file = getattr(args, "config_file", "")
    if config_file and os.path.isfile(config_file):
        with open(config_file, "r", encoding="utf-8") as f:
            logger.info(f"Contents of config file {config_file}:\n{f.read()}")

    if comm.is_main_process() and output_dir:
        from tprd.config import LazyConfig

        path = os.path.join(output_dir, "config.yaml")
        LazyConfig.save(cfg, path)
        logger.info(f"Full config saved to {path}")

    seed = _get(cfg, "train.seed", -1)
    seed = seed_all_rng(None if seed is None or seed < 0 else int(seed) + rank)
    logger.info(f"Random seed: {seed}")

    if not (hasattr(args, "eval_only") and args.eval_only):
        torch.backends.cudnn.benchmark = bool(_get(cfg, "train.cudnn_benchmark", False))
