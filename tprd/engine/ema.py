"""Exponential moving average of a model's weights (``train.model_ema``, as in detrex's configs).

After every optimizer step ``ema = decay * ema + (1 - decay) * weight`` for every trainable
parameter and the floating-point buffers of modules with trainable parameters (BatchNorm
statistics); frozen parts (a distiller's teacher, FrozenBatchNorm, a frozen stem) never change, so
they are not copied. The average lives in :class:`ModelEMA`, is saved in every checkpoint under
``"ema"`` and restored by ``--resume``; :meth:`ModelEMA.applied` swaps it into the model for an
evaluation and swaps the trained weights back afterwards.

Config (``configs/common/train.py``)::

    train.model_ema = dict(enabled=False, decay=0.999, use_ema_weights_for_eval_only=False)

``warmups=N`` (RT-DETR's configs: 2000) makes the decay of update ``u`` (1, 2, ...)
``decay·(1 − exp(−u/N))``, as the reference's ``ModelEMA``, so the early average follows the
weights closely; the update count is checkpointed with the average.

With ``enabled=True`` every evaluation during training runs twice, on the trained weights (the
usual ``bbox/AP`` ...) and on the average (``ema/bbox/AP`` ...); ``--eval-only`` evaluates the
checkpoint's average when ``use_ema_weights_for_eval_only=True`` (an error if it has none).
"""
from __future__ import annotations

import contextlib
import math
from typing import Dict, Iterator, List, Mapping

import torch
from torch import Tensor, nn

from tprd.checkpoint.student import EMA_UPDATES_KEY

from .trainer import HookBase

__all__ = ["ModelEMA", "EMAHook"]

_UPDATES = EMA_UPDATES_KEY  # the update count in a checkpoint's EMA state (with warmups)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class ModelEMA:
    """The running average of ``model``'s trainable parameters and floating-point buffers.

    ``state_dict()`` / ``load_state_dict()`` make it a checkpointable of fvcore's checkpointer.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmups: int = 0):
        if not 0.0 <= float(decay) < 1.0:
            raise ValueError(f"train.model_ema.decay must be in [0, 1), got {decay}")
        if int(warmups) < 0:
            raise ValueError(f"train.model_ema.warmups must be >= 0, got {warmups}")
        self.model = _unwrap(model)
        self.decay = float(decay)
        self.warmups = int(warmups)
        self.updates = 0
        self.names: List[str] = [n for n, p in self.model.named_parameters() if p.requires_grad]
        # floating buffers of modules that train (BatchNorm statistics); those of frozen modules
        # (FrozenBatchNorm, a distiller's teacher) stay as loaded
        for prefix, module in self.model.named_modules():
            if any(p.requires_grad for p in module.parameters(recurse=False)):
                self.names += [
                    f"{prefix}.{n}" if prefix else n
                    for n, b in module.named_buffers(recurse=False)
                    if b.is_floating_point()
                ]
        if not self.names:
            raise ValueError("train.model_ema: the model has no trainable parameters to average")
        self.average: Dict[str, Tensor] = {n: t.detach().clone() for n, t in self._live().items()}
        self.loaded = False  # True once a checkpoint's average was loaded

    @torch.no_grad()
    def reset(self) -> None:
        """Start the average at the model's current weights (after loading train.init_checkpoint)."""
        for n, t in self._live().items():
            self.average[n].copy_(t)

    def _live(self) -> Dict[str, Tensor]:
        tensors = dict(self.model.named_parameters())
        tensors.update(self.model.named_buffers())
        return {n: tensors[n] for n in self.names}

    @torch.no_grad()
    def update(self) -> None:
        """One step of the average (one fused call over all tensors)."""
        live = self._live()
        avg = [self.average[n] for n in self.names]
        cur = [live[n].detach().to(avg[i].dtype) for i, n in enumerate(self.names)]
        self.updates += 1
        torch._foreach_lerp_(avg, cur, 1.0 - self.current_decay())

    def current_decay(self) -> float:
        """The decay of the latest update: ``decay``, or ``decay·(1 − exp(−updates/warmups))``."""
        if self.warmups <= 0:
            return self.decay
        return self.decay * (1.0 - math.exp(-self.updates / self.warmups))

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Inside the block the model holds the averaged weights; the trained ones come back after."""
        live = self._live()
        saved = {n: t.detach().clone() for n, t in live.items()}
        with torch.no_grad():
            for n, t in live.items():
                t.copy_(self.average[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, t in live.items():
                    t.copy_(saved[n])

    def state_dict(self) -> Dict[str, Tensor]:
        out = {n: t.clone() for n, t in self.average.items()}
        if self.warmups > 0:
            out[_UPDATES] = torch.tensor(self.updates, dtype=torch.long)
        return out

    def load_state_dict(self, state: Dict[str, Tensor]) -> None:
        """Our layout (the averaged tensors by name, ``_ema_updates``) or RT-DETR's official one,
        ``{"module": <the whole averaged model's state dict>, "updates": n}`` (its release files and
        ``tools/extract_student.py`` output, docs/rt_detr.md#after-training)."""
        if isinstance(state.get("module"), Mapping):
            updates = state.get("updates")
            state = dict(state["module"])
            if updates is not None:
                state[_UPDATES] = torch.as_tensor(int(updates))
        missing = sorted(set(self.names) - set(state))
        if missing:
            raise KeyError(
                f"the checkpoint's EMA state lacks {len(missing)} entries of this model, e.g. {missing[:3]}; "
                "it was written for another model (resume it with the config that wrote it)"
            )
        for n in self.names:
            self.average[n].copy_(state[n])
        if _UPDATES in state:
            self.updates = int(state[_UPDATES])
        self.loaded = True


class EMAHook(HookBase):
    """Updates a :class:`ModelEMA` after every iteration."""

    def __init__(self, ema: ModelEMA):
        self.ema = ema

    def after_step(self):
        self.ema.update()
