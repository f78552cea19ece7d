"""LR schedules as fvcore ``ParamScheduler`` multipliers, applied by a torch LR scheduler.

A config's ``lr_multiplier`` is a ``ParamScheduler``: a function of the training progress
``where = iteration / max_iter`` in ``[0, 1)`` returning the factor applied to every param group's
base lr. :class:`LRMultiplier` turns it into a ``torch.optim.lr_scheduler.LRScheduler`` (so it
checkpoints like any torch scheduler): at iteration ``i`` each group's lr is
``base_lr * multiplier(i / max_iter)``.

Because the multiplier sees only the fraction of training done, a schedule written for
``max_iter_a`` iterations stretches or shrinks with ``train.max_iter`` (milestones at the same
fraction of training).
"""
from __future__ import annotations

from typing import Any, Dict

import torch
from fvcore.common.param_scheduler import ParamScheduler

__all__ = ["LRMultiplier", "WarmupParamScheduler"]


class WarmupParamScheduler(ParamScheduler):
    """``scheduler`` with a warmup over the first ``warmup_length`` fraction of training.

    During warmup the value ramps from ``warmup_factor * scheduler(0)`` to ``scheduler(warmup_length)``,
    linearly (``warmup_method="linear"``) or stays at the start value (``"constant"``); after it
    the wrapped scheduler is used unchanged (its clock is not shifted).
    """

    def __init__(
        self,
        scheduler: ParamScheduler,
        warmup_factor: float = 0.001,
        warmup_length: float = 0.0,
        warmup_method: str = "linear",
    ):
        if warmup_method not in ("linear", "constant"):
            raise ValueError(f"warmup_method must be 'linear' or 'constant', got {warmup_method!r}.")
        if not 0.0 <= warmup_length < 1.0:
            raise ValueError(f"warmup_length is a fraction of training in [0, 1), got {warmup_length}.")
        self._scheduler = scheduler
        self._factor = float(warmup_factor)
        self._length = float(warmup_length)
        self._method = warmup_method

    def __call__(self, where: float) -> float:
        if where >= self._length:
            return self._scheduler(where)
        start = self._factor * self._scheduler(0.0)
        if self._method == "constant":
            return start
        end = self._scheduler(self._length)
        alpha = where / self._length
        return start + (end - start) * alpha


class LRMultiplier(torch.optim.lr_scheduler.LRScheduler):
    """Set each group's lr to ``initial_lr * multiplier(iteration / max_iter)``.

    Call :meth:`step` once per iteration (the :class:`tprd.engine.hooks.LRScheduler` hook does).
    The state dict holds ``last_epoch`` (= the iteration) and the base lrs; the multiplier itself
    comes from the config again on resume.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, multiplier: ParamScheduler, max_iter: int, last_iter: int = -1):
        if not callable(multiplier):
            raise TypeError(f"multiplier must be a ParamScheduler (callable), got {type(multiplier).__name__}.")
        if int(max_iter) < 1:
            raise ValueError(f"max_iter must be >= 1, got {max_iter}.")
        self._multiplier = multiplier
        self._max_iter = int(max_iter)
        super().__init__(optimizer, last_epoch=last_iter)

    def state_dict(self) -> Dict[str, Any]:
        return {"base_lrs": list(self.base_lrs), "last_epoch": self.last_epoch}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.base_lrs = list(state_dict["base_lrs"])
        self.last_epoch = int(state_dict["last_epoch"])
        self._last_lr = self.get_lr()

    def get_lr(self):
        factor = self._multiplier(min(self.last_epoch / self._max_iter, 1.0))
        return [base * factor for base in self.base_lrs]

    def _get_closed_form_lr(self):
        return self.get_lr()
