"""Hooks around the training loop; each can be read on its own.

* :class:`IterationSeeds` — seeds torch (CPU and CUDA), numpy and python before every step from
  ``(seed, rank, iteration)``, so dropout and other draws of a resumed run equal the uninterrupted
  run's; the base seed is saved in every checkpoint.
* :class:`IterationTimer` — time per iteration into the storage; total time at the end.
* :class:`LRScheduler` — records the lr and steps a torch LR scheduler after every iteration.
* :class:`PeriodicCheckpointer` — ``model_{iter:07d}.pth`` every ``period`` iterations (keeps the
  newest ``max_to_keep``), ``model_final.pth`` at the end; nothing after a failure.
* :class:`EvalHook` — evaluation every ``eval_period`` iterations and after the last one; metrics
  go into the storage as ``bbox/AP`` etc.
* :class:`PeriodicWriter` — runs the writers every ``period`` iterations and at the end.
* :class:`ProgressBar` — a live bar (iteration, smoothed total loss, s/it, ETA) on a terminal.
"""
from __future__ import annotations

import contextlib
import datetime
import glob
import logging
import os
import random
import re
import time
import warnings
from collections import abc
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch

from . import comm
from .events import EventWriter
from .trainer import HookBase

__all__ = [
    "HookBase",
    "CallbackHook",
    "IterationSeeds",
    "iteration_seed",
    "IterationTimer",
    "LRScheduler",
    "PeriodicCheckpointer",
    "EvalHook",
    "PeriodicWriter",
    "ProgressBar",
    "flatten_results_dict",
]

logger = logging.getLogger("tprd.engine")


class CallbackHook(HookBase):
    """A hook made of optional functions ``f(trainer)``."""

    def __init__(self, *, before_train=None, after_train=None, before_step=None, after_step=None):
        self._before_train = before_train
        self._after_train = after_train
        self._before_step = before_step
        self._after_step = after_step

    def before_train(self):
        if self._before_train:
            self._before_train(self.trainer)

    def after_train(self):
        if self._after_train:
            self._after_train(self.trainer)

    def before_step(self):
        if self._before_step:
            self._before_step(self.trainer)

    def after_step(self):
        if self._after_step:
            self._after_step(self.trainer)


def iteration_seed(seed: int, rank: int, iteration: int) -> int:
    """The seed of one training step on one process: a 63-bit hash of ``(seed, rank, iteration)``
    (numpy's ``SeedSequence``, so neighbouring iterations or ranks get unrelated streams)."""
    entropy = [int(seed) & 0xFFFFFFFFFFFFFFFF, int(rank), int(iteration)]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


class IterationSeeds(HookBase):
    """Before every step, seed torch (CPU and every CUDA device), numpy and python with
    :func:`iteration_seed` of ``(seed, rank, iteration)``.

    The random state a step uses (dropout masks, DINO's denoising noise, any method drawing from
    the global generators) is then a function of the base seed, the process and the iteration
    alone: a run resumed at iteration ``i`` draws exactly what the uninterrupted run drew at ``i``,
    on every process, whatever ran before (evaluation, checkpoint writes, the data loader) and
    without storing generator states. The data order is derived the same way by the train loader
    (see :func:`tprd.data.loader.skip_train_batches`), and the methods with their own generators
    (MGD masks, KD-DETR points) seed them from the Distiller's iteration.

    The base seed is a checkpointable (``state_dict`` ``{"seed": ...}``): the checkpointer saves it
    and ``--resume`` restores it, which matters when ``train.seed`` is negative (drawn at random by
    rank 0 and shared by every process).
    """

    def __init__(self, seed: Optional[int] = None):
        if seed is None or int(seed) < 0:
            seed = comm.shared_random_seed()
        self.seed = int(seed)

    def before_step(self):
        step_seed = iteration_seed(self.seed, comm.get_rank(), self.trainer.iter)
        torch.manual_seed(step_seed)  # also every CUDA device
        np.random.seed(step_seed % 2**32)
        random.seed(step_seed)

    def state_dict(self) -> Dict[str, Any]:
        return {"seed": self.seed}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.seed = int(state["seed"])


class IterationTimer(HookBase):
    """Puts ``time`` (seconds of the step, hooks after it excluded) into the storage."""

    def __init__(self, warmup_iter: int = 3):
        self._warmup_iter = warmup_iter
        self._step_start = 0.0
        self._train_start = 0.0
        self._timed_iters = 0
        self._timed_seconds = 0.0

    def before_train(self):
        self._train_start = time.perf_counter()

    def before_step(self):
        self._step_start = time.perf_counter()

    def after_step(self):
        seconds = time.perf_counter() - self._step_start
        done = self.trainer.iter - self.trainer.start_iter + 1
        if done > self._warmup_iter:
            self._timed_iters += 1
            self._timed_seconds += seconds
        if comm.is_main_process():
            self.trainer.storage.put_scalar("time", seconds)

    def after_train(self):
        total = time.perf_counter() - self._train_start
        if self._timed_iters > 0:
            logger.info(
                f"Overall training speed: {self._timed_iters} iterations in "
                f"{datetime.timedelta(seconds=int(self._timed_seconds))} "
                f"({self._timed_seconds / self._timed_iters:.4f} s / it)"
            )
        logger.info(f"Total training time: {datetime.timedelta(seconds=int(total))}")


class LRScheduler(HookBase):
    """Step ``scheduler`` after every iteration and record the lr of the largest param group."""

    def __init__(self, scheduler: torch.optim.lr_scheduler.LRScheduler, optimizer: Optional[torch.optim.Optimizer] = None):
        self.scheduler = scheduler
        self.optimizer = optimizer if optimizer is not None else scheduler.optimizer
        self._group = None

    def before_train(self):
        # The group with the most parameters (the "main" lr; backbone groups are smaller).
        groups = self.optimizer.param_groups
        self._group = max(range(len(groups)), key=lambda i: (len(groups[i]["params"]), groups[i]["lr"]))

    def after_step(self):
        lr = self.optimizer.param_groups[self._group]["lr"]
        if comm.is_main_process():
            self.trainer.storage.put_scalar("lr", lr, smoothing_hint=False)
        with warnings.catch_warnings():
            # With fp16 AMP the grad scaler skips optimizer steps whose gradients overflow; torch
            # then warns that the scheduler stepped first, which is expected here.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
            self.scheduler.step()

    def state_dict(self):
        return self.scheduler.state_dict()


class PeriodicCheckpointer(HookBase):
    """Save a checkpoint every ``period`` iterations and ``{prefix}_final`` after the last one.

    Only the newest ``max_to_keep`` periodic checkpoints of this output folder are kept (older
    ones, also those of a previous run that is being resumed, are deleted); the final checkpoint
    is never deleted. When training stops with an exception, nothing is saved.
    """

    def __init__(self, checkpointer, period: int, max_to_keep: Optional[int] = None, file_prefix: str = "model"):
        self.checkpointer = checkpointer
        self.period = int(period)
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1 or None, got {max_to_keep}.")
        self.max_to_keep = max_to_keep
        self.file_prefix = file_prefix
        self.recent: List[str] = []

    def before_train(self):
        save_dir = self.checkpointer.save_dir
        if not save_dir:
            return
        pattern = re.compile(re.escape(self.file_prefix) + r"_(\d{7})\.pth$")
        found = []
        for path in glob.glob(os.path.join(save_dir, f"{self.file_prefix}_*.pth")):
            m = pattern.search(os.path.basename(path))
            if m:
                found.append((int(m.group(1)), path))
        self.recent = [p for _, p in sorted(found)]

    def _save(self, name: str) -> None:
        self.checkpointer.save(name, iteration=int(self.trainer.iter))

    def after_step(self):
        it = self.trainer.iter
        if self.period > 0 and (it + 1) % self.period == 0 and it + 1 < self.trainer.max_iter:
            name = f"{self.file_prefix}_{it:07d}"
            self._save(name)
            path = os.path.join(self.checkpointer.save_dir, name + ".pth")
            if path in self.recent:
                self.recent.remove(path)
            self.recent.append(path)
            self._prune()

    def _prune(self) -> None:
        if self.max_to_keep is None or not comm.is_main_process():
            return
        while len(self.recent) > self.max_to_keep:
            old = self.recent.pop(0)
            if os.path.exists(old):
                os.remove(old)

    def after_train(self):
        if self.trainer.failed:
            last = self.checkpointer.get_checkpoint_file() if self.checkpointer.has_checkpoint() else ""
            if last:
                logger.warning(f"Training stopped with an error; the last checkpoint is {last} "
                               "(--resume continues from it once the error is fixed).")
            else:
                logger.warning("Training stopped with an error before any checkpoint was written.")
            return
        if self.trainer.iter >= self.trainer.max_iter and self.trainer.start_iter < self.trainer.max_iter:
            # Stored iteration = the last iteration run.
            self.checkpointer.save(f"{self.file_prefix}_final", iteration=int(self.trainer.max_iter - 1))


def flatten_results_dict(results: Mapping[str, Any], prefix: str = "") -> Dict[str, float]:
    """``{"bbox": {"AP": 1.0}}`` -> ``{"bbox/AP": 1.0}`` (non-numeric leaves are dropped)."""
    out: Dict[str, float] = {}
    for k, v in results.items():
        key = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, abc.Mapping):
            out.update(flatten_results_dict(v, key))
        else:
            try:
                out[key] = float(v)
            except (TypeError, ValueError):
                continue
    return out


class EvalHook(HookBase):
    """Run ``eval_function()`` every ``eval_period`` iterations and once after the last one.

    ``eval_function`` returns a (nested) dict of metrics (``{"bbox": {"AP": ..}}``) on the main
    process ({} elsewhere); the flattened values go into the storage without smoothing, so the
    writers put them into ``metrics.json`` as ``"bbox/AP"`` etc.
    """

    def __init__(self, eval_period: int, eval_function: Callable[[], Mapping[str, Any]], eval_after_train: bool = True):
        self._period = int(eval_period)
        self._func = eval_function
        self._eval_after_train = eval_after_train
        self.last_results: Optional[Mapping[str, Any]] = None

    def _do_eval(self):
        results = self._func()
        self.last_results = results
        if comm.is_main_process() and results:
            flat = flatten_results_dict(results)
            for k, v in flat.items():
                self.trainer.storage.put_scalar(k, v, smoothing_hint=False)
        # Evaluation may take different times on each rank; line them up before training on.
        comm.synchronize()

    def after_step(self):
        next_iter = self.trainer.iter + 1
        if self._period > 0 and next_iter % self._period == 0 and next_iter != self.trainer.max_iter:
            self._do_eval()

    def after_train(self):
        if self.trainer.failed or not self._eval_after_train:
            return
        if self.trainer.iter >= self.trainer.max_iter:
            self._do_eval()
        # Drop the reference to the evaluation function (it may hold data loaders/workers).
        del self._func


class PeriodicWriter(HookBase):
    """Call ``writer.write()`` for every writer every ``period`` iterations and at the end."""

    def __init__(self, writers: Sequence[EventWriter], period: int = 20):
        self._writers = list(writers)
        self._period = max(int(period), 1)

    def after_step(self):
        it = self.trainer.iter
        if (it + 1) % self._period == 0 or it == self.trainer.max_iter - 1:
            for w in self._writers:
                w.write()

    def after_train(self):
        for w in self._writers:
            # Final evaluation results (put after the last step) still have to be written.
            w.write()
            w.close()


class ProgressBar(HookBase):
    """A live training bar on the main process's terminal, updated after every iteration.

    Shows ``iteration/max_iter``, the total loss (median of the last ``window`` iterations),
    seconds per iteration and the ETA; nothing is drawn when standard error is not a terminal (CI,
    log files), where the log line of :class:`PeriodicWriter` reports progress instead. ``file`` and
    ``enabled`` are passed to :func:`tprd.progress.progress_bar`.
    """

    def __init__(self, window: int = 20, file=None, enabled: Optional[bool] = None):
        self._window = int(window)
        self._file = file
        self._enabled = enabled
        self._stack = contextlib.ExitStack()
        self._bar = None

    def before_train(self):
        from tprd.progress import SECONDS_PER_UNIT, progress_bar

        t = self.trainer
        self._bar = self._stack.enter_context(
            progress_bar(t.max_iter, "train", unit="it", initial=t.start_iter, file=self._file,
                         enabled=self._enabled, bar_format=SECONDS_PER_UNIT)
        )

    def after_step(self):
        self._bar.update(1)
        histories = self.trainer.storage.histories()
        if "total_loss" in histories:
            self._bar.set_postfix_str(f"loss {histories['total_loss'].median(self._window):.4g}")

    def after_train(self):
        self._stack.close()
