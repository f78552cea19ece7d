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
from ..utils import cpu_allocator
from ..utils.malloc import set_mmap_threshold

__all__ = ["default_argument_parser", "default_setup", "user_errors_exit", "USER_ERRORS", "find_user_error", "add_override_arguments", "override_parser", "setup_logger", "seed_all_rng", "collect_env_info"]


class _OverrideParser(argparse.ArgumentParser):
    """An argument parser whose config overrides may be given either way: ``--opts KEY=VALUE ...``
    (every tool) or, after the options, as plain ``KEY=VALUE`` words; both end in ``args.opts``."""

    def parse_known_args(self, args=None, namespace=None):
        ns, rest = super().parse_known_args(args, namespace)
        flagged = getattr(ns, "opts_flag", None)
        if hasattr(ns, "opts_flag"):
            del ns.opts_flag
            ns.opts = list(flagged or []) + list(getattr(ns, "opts", None) or [])
        return ns, rest


def add_override_arguments(parser: argparse.ArgumentParser, positional: bool = True) -> argparse.ArgumentParser:
    """The one override convention of the tools: ``--opts KEY=VALUE ...`` (last on the command line)
    and, with ``positional``, plain ``KEY=VALUE`` words after the options too (both in ``args.opts``;
    the parser must come from :func:`override_parser` or :func:`default_argument_parser`)."""
    parser.add_argument("--opts", dest="opts_flag", nargs=argparse.REMAINDER, default=None, metavar="KEY=VALUE",
                        help="config overrides, e.g. --opts train.device=cpu train.init_checkpoint=model.pth "
                        "(last on the command line; plain KEY=VALUE words after the options work too)")
    if positional:
        parser.add_argument("opts", nargs=argparse.REMAINDER, default=None, help=argparse.SUPPRESS)
    return parser


def override_parser(**kwargs: Any) -> argparse.ArgumentParser:
    """An ``argparse.ArgumentParser`` for a tool, with :func:`add_override_arguments` to call on it."""
    return _OverrideParser(**kwargs)


def default_argument_parser(epilog: Optional[str] = None) -> argparse.ArgumentParser:
    parser = _OverrideParser(
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
    parser.add_argument(
        "--allow-config-change",
        action="store_true",
        help="with --resume: continue even when the model or distillation methods of the given config "
        "differ from the run's config.yaml (refused otherwise, naming the differing keys)",
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the traceback of errors in your files and values (same as TPRD_DEBUG=1); by default "
        "they are one line 'error: ...' and exit code 2",
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
        "train.max_iter=1000 dataloader.train.total_batch_size=8 (or after --opts, as every tool takes them)",
        default=None,
        nargs=argparse.REMAINDER,
    )
    parser.add_argument("--opts", dest="opts_flag", nargs=argparse.REMAINDER, default=None, metavar="KEY=VALUE",
                        help="the same overrides after --opts (last on the command line)")
    return parser


def _user_errors() -> tuple:
    from tprd.checkpoint import CheckpointFileError, CheckpointMismatchError
    from tprd.config import ConfigLoadError, ConfigOverrideError
    from tprd.errors import UserError

    return (ConfigLoadError, ConfigOverrideError, CheckpointFileError, CheckpointMismatchError, FileNotFoundError,
            UserError)


#: Errors in what the user gave (config file, overrides, weight files, data, device): reported by
#: :func:`user_errors_exit` as a message, without a traceback. Everything else is a bug.
USER_ERRORS = _user_errors()


def find_user_error(error: BaseException) -> Optional[BaseException]:
    """The user error behind ``error``, or None when ``error`` is a bug.

    ``error`` itself when it is one of :data:`USER_ERRORS`; through the wrappers that building a
    config adds (:class:`~tprd.config.InstantiationError`, whose cause is the real error) the
    wrapped one; an ``InstantiationError`` that is about the config itself (a ``_target_`` that
    does not exist, an argument the target does not take) is one too.
    """
    from tprd.config import InstantiationError

    seen = set()
    current: Optional[BaseException] = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, USER_ERRORS):
            return current
        if not isinstance(current, InstantiationError):
            return None
        if getattr(current, "user_error", False):
            return current
        current = current.__cause__
    return None


def user_error_message(error: BaseException) -> str:
    """The text of a user error: its message; for one re-raised by a torch DataLoader worker
    (whose message holds the worker's traceback) the original message only."""
    text = str(error)
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        name = type(error).__name__
        cut = last.find(name + ": ")
        text = last[cut + len(name) + 2:] if cut >= 0 else last
    return text


def debug_enabled() -> bool:
    from tprd.errors import DEBUG_ENV

    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


@contextlib.contextmanager
def user_errors_exit(exit_code: int = 2):
    """Turn a user error raised inside (see :func:`find_user_error`) into ``error: <message>`` on
    stderr as the last line(s) of output and exit with ``exit_code``; other exceptions keep their
    traceback, and so do user errors when ``TPRD_DEBUG=1`` (``--debug``) is set."""
    try:
        yield
    except Exception as e:
        found = find_user_error(e)
        if found is None or debug_enabled():
            raise
        sys.stdout.flush()
        print(f"error: {user_error_message(found)}", file=sys.stderr, flush=True)
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


def default_setup(cfg: Any, args: Any, save_config: bool = True) -> None:
    """Per-run setup on every process:

    1. create ``train.output_dir`` (main process);
    2. logging to the console (main process) and ``output_dir/log.txt``;
    3. log the environment, the command line and the config file;
    4. seed python/numpy/torch with ``train.seed + rank`` (a negative seed: random);
    5. save the full config as ``output_dir/config.yaml`` (main process; ``save_config=False``
       leaves that to the caller, see :func:`save_run_config`);
    6. ``torch.backends.cudnn.benchmark = train.cudnn_benchmark`` (default False);
    7. glibc's mmap threshold fixed at ``train.cpu_mmap_threshold`` bytes when set
       (:func:`tprd.utils.malloc.set_mmap_threshold`; default None: glibc's own);
    8. torch's CPU allocator per ``train.cpu_allocator`` (:func:`tprd.utils.cpu_allocator.apply_config`;
       default ``"auto"``: the caching allocator when ``train.device`` is ``cpu``).
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

    if save_config:
        save_run_config(cfg)

    seed = _get(cfg, "train.seed", -1)
    seed = seed_all_rng(None if seed is None or seed < 0 else int(seed) + rank)
    logger.info(f"Random seed: {seed}")

    if not (hasattr(args, "eval_only") and args.eval_only):
        torch.backends.cudnn.benchmark = bool(_get(cfg, "train.cudnn_benchmark", False))

    threshold = _get(cfg, "train.cpu_mmap_threshold", None)
    if set_mmap_threshold(threshold):
        logger.info(f"glibc mmap threshold fixed at {threshold} bytes (train.cpu_mmap_threshold)")
    choice = _get(cfg, "train.cpu_allocator", "auto")
    if cpu_allocator.apply_config(choice, _get(cfg, "train.device", "cuda")):
        logger.info("CPU tensors of 1 MiB or more are cached and reused across steps "
                    "(train.cpu_allocator; \"default\" keeps torch's allocator)")


def save_run_config(cfg: Any) -> None:
    """Write the full config as ``<train.output_dir>/config.yaml`` (main process). The engine calls
    it once the model, the data and the weights are built and checked, so a run that stops on an
    error in them leaves an earlier run's ``config.yaml`` as it was."""
    output_dir = _get(cfg, "train.output_dir")
    if comm.is_main_process() and output_dir:
        from tprd.config import LazyConfig

        path = os.path.join(output_dir, "config.yaml")
        LazyConfig.save(cfg, path)
        logging.getLogger("tprd").info(f"Full config saved to {path}")
