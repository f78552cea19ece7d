"""The training loop: ``TrainerBase`` (iterations + hooks), ``SimpleTrainer`` and ``AMPTrainer``.

One iteration (:meth:`SimpleTrainer.run_step`)::

    data = next(loader)                       # list of sample dicts
    loss_dict = model(data)                   # weighted losses
    losses = sum(loss_dict.values())
    check every loss is finite                # else FloatingPointError naming iteration and keys
    optimizer.zero_grad(); losses.backward()
    clip the global gradient norm             # train.clip_grad
    optimizer.step()

Everything else (LR schedule, checkpoints, evaluation, logging) is a hook
(:mod:`tprd.engine.hooks`) called before/after training and before/after every step.
"""
from __future__ import annotations

import logging
import time
import weakref
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import torch
from torch.nn.parallel import DistributedDataParallel

from . import comm
from .events import EventStorage, get_event_storage

__all__ = ["HookBase", "TrainerBase", "SimpleTrainer", "AMPTrainer", "create_ddp_model"]

logger = logging.getLogger("tprd.engine")


class HookBase:
    """A hook is called by the trainer at four points; ``self.trainer`` is set on registration.

    ``trainer.iter`` is the iteration being (or just) run; ``trainer.failed`` is True in
    ``after_train`` when the loop stopped with an exception.
    """

    trainer: "TrainerBase"

    def before_train(self) -> None:
        pass

    def after_train(self) -> None:
        pass

    def before_step(self) -> None:
        pass

    def after_step(self) -> None:
        pass

    def state_dict(self) -> Dict[str, Any]:
        return {}


class TrainerBase:
    """Iterates ``[start_iter, max_iter)`` calling ``run_step`` between the hooks."""

    def __init__(self) -> None:
        self._hooks: List[HookBase] = []
        self.iter: int = 0
        self.start_iter: int = 0
        self.max_iter: int = 0
        self.failed: bool = False
        self.storage: Optional[EventStorage] = None

    def register_hooks(self, hooks: Sequence[Optional[HookBase]]) -> None:
        for h in hooks:
            if h is None:
                continue
            if not isinstance(h, HookBase):
                raise TypeError(f"Hooks must derive from HookBase, got {type(h).__name__}.")
            # A weak reference avoids a trainer <-> hook reference cycle.
            h.trainer = weakref.proxy(self)
            self._hooks.append(h)

    def train(self, start_iter: int, max_iter: int) -> None:
        self.iter = self.start_iter = int(start_iter)
        self.max_iter = int(max_iter)
        self.failed = False
        logger.info(f"Starting training from iteration {start_iter} (max_iter {max_iter})")
        with EventStorage(start_iter) as self.storage:
            try:
                self.before_train()
                for self.iter in range(self.start_iter, self.max_iter):
                    self.storage.iter = self.iter
                    self.before_step()
                    self.run_step()
                    self.after_step()
                # After a normal end ``self.iter == max_iter``: hooks read it in ``after_train``
                # to tell a finished run from one stopped by an exception.
                self.iter = self.max_iter
            except BaseException:
                self.failed = True
                logger.exception(f"Exception during training (iteration {self.iter}):")
                raise
            finally:
                self.after_train()

    def before_train(self) -> None:
        for h in self._hooks:
            h.before_train()

    def after_train(self) -> None:
        # Scalars put now (final evaluation) belong to the last iteration that ran.
        self.storage.iter = min(self.iter, self.max_iter - 1)
        for h in self._hooks:
            h.after_train()

    def before_step(self) -> None:
        for h in self._hooks:
            h.before_step()

    def after_step(self) -> None:
        for h in self._hooks:
            h.after_step()

    def run_step(self) -> None:
        raise NotImplementedError


def _check_finite(loss_dict: Mapping[str, torch.Tensor], iteration: int) -> None:
    """Raise ``FloatingPointError`` naming the iteration and every non-finite loss term.

    With several processes the verdict is shared (all-reduce), so every rank stops at the same
    iteration instead of the healthy ones waiting forever in the backward all-reduce.
    """
    values = torch.stack([v.detach().float().reshape(()) for v in loss_dict.values()])
    finite = torch.isfinite(values)
    all_finite = finite.all()
    if comm.get_world_size() > 1:
        flag = all_finite.to(torch.int32)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        all_finite = flag.bool()
    if bool(all_finite):
        return
    bad = [f"{k}={v.item()}" for (k, v), ok in zip(loss_dict.items(), finite.tolist()) if not ok]
    where = ", ".join(bad) if bad else f"none on rank {comm.get_rank()} (another process had them)"
    raise FloatingPointError(
        f"Loss became infinite or NaN at iteration {iteration}: non-finite loss terms: "
        f"{where}. Training stopped; no checkpoint was written for this state "
        f"(the last good checkpoint is kept)."
    )


class SimpleTrainer(TrainerBase):
    """Plain fp32 training of a model that returns a dict of (already weighted) losses.

    Args:
        model: a module whose training forward takes the list of samples and returns
            ``{name: scalar loss}``; may be DDP-wrapped.
        data_loader: an iterable of batches (iterated forever: the loader must be infinite or
            long enough).
        optimizer: a torch optimizer.
        clip_grad_params: ``None`` (no clipping) or ``{"max_norm": .., "norm_type": ..}``:
            clip the norm of all gradients together (``torch.nn.utils.clip_grad_norm_``).
    """

    def __init__(self, model: torch.nn.Module, data_loader: Iterable, optimizer: torch.optim.Optimizer,
                 clip_grad_params: Optional[Mapping[str, Any]] = None) -> None:
        super().__init__()
        model.train()
        self.model = model
        self.data_loader = data_loader
        self._data_iter = None
        self.optimizer = optimizer
        self.clip_grad_params = dict(clip_grad_params) if clip_grad_params else None

    @property
    def data_iter(self):
        if self._data_iter is None:
            self._data_iter = iter(self.data_loader)
        return self._data_iter

    def _next_batch(self):
        start = time.perf_counter()
        data = next(self.data_iter)
        return data, time.perf_counter() - start

    def _forward(self, data) -> Dict[str, torch.Tensor]:
        loss_dict = self.model(data)  # a model reads the iteration from the event storage
        if isinstance(loss_dict, torch.Tensor):
            loss_dict = {"total_loss": loss_dict}
        if not isinstance(loss_dict, Mapping) or not loss_dict:
            raise TypeError(
                "In training mode the model must return a non-empty dict of losses, got "
                f"{type(loss_dict).__name__}."
            )
        return dict(loss_dict)

    def _clip(self) -> Optional[torch.Tensor]:
        if not self.clip_grad_params:
            return None
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            return None
        return torch.nn.utils.clip_grad_norm_(params, **self.clip_grad_params)

    def run_step(self) -> None:
        assert self.model.training, "SimpleTrainer: the model was switched to eval mode!"
        data, data_time = self._next_batch()
        loss_dict = self._forward(data)
        losses = sum(loss_dict.values())
        _check_finite(loss_dict, self.iter)

        self.optimizer.zero_grad(set_to_none=True)
        losses.backward()
        grad_norm = self._clip()
        self.optimizer.step()
        self._write_metrics(loss_dict, data_time, grad_norm)

    def _write_metrics(
        self,
        loss_dict: Mapping[str, torch.Tensor],
        data_time: float,
        grad_norm: Optional[torch.Tensor] = None,
    ) -> None:
        """Average losses (and data time, max over ranks) across processes and store them."""
        metrics = {k: v.detach().float().reshape(()) for k, v in loss_dict.items()}
        reduced = comm.reduce_dict(metrics)
        # Statistics the model put besides its losses (the Distiller's per-stage TPRD shares).
        extra = {k: v.float().reshape(()) for k, v in get_event_storage().pop_stats().items()}
        extra = comm.reduce_dict(extra) if extra else {}
        data_times = comm.all_gather(data_time) if comm.get_world_size() > 1 else [data_time]
        if not comm.is_main_process():
            return
        storage = get_event_storage()
        storage.put_scalar("data_time", max(data_times))
        values = {k: float(v) for k, v in reduced.items()}
        storage.put_scalar("total_loss", sum(values.values()))
        for k, v in values.items():
            storage.put_scalar(k, v)
        storage.loss_names.update(values)
        storage.loss_names.add("total_loss")
        for k, v in extra.items():
            storage.put_scalar(k, float(v))
        if grad_norm is not None:
            storage.put_scalar("grad_norm", float(grad_norm))

    def state_dict(self) -> Dict[str, Any]:
        return {"iteration": self.iter}


class AMPTrainer(SimpleTrainer):
    """Mixed precision: autocast to ``dtype`` (float16 with a ``GradScaler``, or bfloat16).

    With float16 the gradients are unscaled before clipping, so ``clip_grad`` means the same
    threshold as in fp32 training; steps whose gradients overflow are skipped by the scaler.
    """

    def __init__(self, model: torch.nn.Module, data_loader: Iterable, optimizer: torch.optim.Optimizer,
                 clip_grad_params: Optional[Mapping[str, Any]] = None, dtype: torch.dtype = torch.float16,
                 device_type: Optional[str] = None, grad_scaler: Optional[torch.amp.GradScaler] = None) -> None:
        super().__init__(model, data_loader, optimizer, clip_grad_params)
        if isinstance(dtype, str):
            dtype = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16,
                     "bf16": torch.bfloat16}[dtype]
        if dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"AMPTrainer: dtype must be float16 or bfloat16, got {dtype}.")
        if device_type is None:
            try:
                device_type = next(model.parameters()).device.type
            except StopIteration:
                device_type = "cpu"
        self.device_type = device_type
        self.dtype = dtype
        if dtype == torch.float16 and grad_scaler is None:
            grad_scaler = torch.amp.GradScaler(device_type)
        self.grad_scaler = grad_scaler if dtype == torch.float16 else None

    def run_step(self) -> None:
        assert self.model.training, "AMPTrainer: the model was switched to eval mode!"
        data, data_time = self._next_batch()
        with torch.autocast(device_type=self.device_type, dtype=self.dtype):
            loss_dict = self._forward(data)
            losses = sum(loss_dict.values())
        _check_finite(loss_dict, self.iter)

        self.optimizer.zero_grad(set_to_none=True)
        if self.grad_scaler is not None:
            self.grad_scaler.scale(losses).backward()
            self.grad_scaler.unscale_(self.optimizer)
            grad_norm = self._clip()
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            losses.backward()
            grad_norm = self._clip()
            self.optimizer.step()
        self._write_metrics(loss_dict, data_time, grad_norm)


def create_ddp_model(model: torch.nn.Module, *, fp16_compression: bool = False, **kwargs: Any) -> torch.nn.Module:
    """Wrap ``model`` in DistributedDataParallel when there is more than one process.

    ``kwargs`` go to DDP (e.g. ``broadcast_buffers=False``, ``find_unused_parameters``);
    ``device_ids`` is filled in with the local GPU for CUDA models.
    """
    if comm.get_world_size() == 1:
        return model
    if "device_ids" not in kwargs:
        try:
            device = next(model.parameters()).device
        except StopIteration:
            device = torch.device("cpu")
        if device.type == "cuda":
            kwargs["device_ids"] = [comm.get_local_rank()]
    ddp = DistributedDataParallel(model, **kwargs)
    if fp16_compression:
        from torch.distributed.algorithms.ddp_comm_hooks import default as comm_hooks

        ddp.register_comm_hook(state=None, hook=comm_hooks.fp16_compress_hook)
    return ddp
