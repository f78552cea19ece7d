"""Crash-safe checkpointing on top of fvcore's ``Checkpointer``.

:class:`DetectionCheckpointer` adds to fvcore's checkpointer:

* atomic saves: the checkpoint is written to a hidden temporary file in the same folder, flushed
  to disk and renamed over the final name (``os.replace``), then ``last_checkpoint`` is rewritten
  the same way. A Ctrl-C or kill at any moment leaves either the old or the new file, never a
  truncated one, and ``last_checkpoint`` only ever names a complete file; files get the usual
  permissions (0o666 minus the umask); :func:`remove_leftover_temporary_files` deletes the
  temporary files of writes killed by SIGKILL (done at the start of every training run);
* saving only on the main process (all processes may call :meth:`save`);
* reading ``.pkl`` files (pickled state dicts, numpy arrays) next to torch files, through
  :func:`tprd.checkpoint.read_weight_file` (a file that is not a checkpoint is a clear error);
* :meth:`resume_or_load`: resume = the newest checkpoint of the output folder with optimizer,
  scheduler, grad scaler and iteration; otherwise ``train.init_checkpoint`` into the model only,
  through :func:`tprd.checkpoint.load_init_state_dict` (its own, detrex or backbone-only key names;
  strict for evaluation, a checked and reported partial load for training).
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, Optional

import numpy as np
import torch
from fvcore.common.checkpoint import Checkpointer
from torch.nn.parallel import DistributedDataParallel

from tprd.checkpoint.files import atomic_torch_save, atomic_write_text, remove_leftover_temporary_files

from . import comm

__all__ = ["DetectionCheckpointer", "atomic_torch_save", "atomic_write_text", "remove_leftover_temporary_files"]

logger = logging.getLogger("tprd.checkpoint")


class DetectionCheckpointer(Checkpointer):
    """fvcore ``Checkpointer`` with atomic saves, ``.pkl`` support and detrex weight loading.

    Args:
        model: the model (a DDP wrapper is unwrapped).
        save_dir: the output folder; checkpoints are ``save_dir/<name>.pth``.
        save_to_disk: default: only the main process writes.
        checkpointables: objects with ``state_dict``/``load_state_dict`` (``optimizer=``,
            ``scheduler=``, ``scaler=`` ...), saved and restored on resume.
    """

    def __init__(self, model: torch.nn.Module, save_dir: str = "", *, save_to_disk: Optional[bool] = None, **checkpointables: Any):
        if save_to_disk is None:
            save_to_disk = comm.is_main_process()
        checkpointables = {k: v for k, v in checkpointables.items() if v is not None}
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        self.logger = logger

    # ---------------------------------------------------------------------------- saving
    def save(self, name: str, **kwargs: Any) -> None:
        """Write ``save_dir/<name>.pth`` (model, checkpointables, ``kwargs``) atomically."""
        if not self.save_dir or not self.save_to_disk:
            return
        data: Dict[str, Any] = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        atomic_torch_save(data, save_file)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        atomic_write_text(os.path.join(self.save_dir, "last_checkpoint"), last_filename_basename)

    # ---------------------------------------------------------------------------- finding
    def get_checkpoint_file(self) -> str:
        """The file ``last_checkpoint`` names; if it is gone, the newest ``.pth`` in the folder."""
        if not self.save_dir or not os.path.isdir(self.save_dir):
            return ""
        path = super().get_checkpoint_file()
        if path and os.path.isfile(path):
            return path
        candidates = [p for p in self.get_all_checkpoint_files() if os.path.isfile(p)]
        if not candidates:
            return ""
        newest = max(candidates, key=os.path.getmtime)
        self.logger.warning(f"last_checkpoint names {path!r}, which does not exist; using {newest}.")
        return newest

    def has_checkpoint(self) -> bool:
        return bool(self.save_dir) and bool(self.get_checkpoint_file())

    # ---------------------------------------------------------------------------- loading
    def _load_file(self, filename: str) -> Dict[str, Any]:
        """``{"model": state dict, ...}`` from any weight file (see
        :func:`tprd.checkpoint.read_weight_file`); a bare state dict or ``{"state_dict": ...}`` is
        wrapped, numpy arrays (``.pkl``) become tensors."""
        from tprd.checkpoint import read_weight_file

        data = dict(read_weight_file(filename))
        if "model" not in data:
            data = {"model": data["state_dict"] if isinstance(data.get("state_dict"), dict) else data}
        data["model"] = {k: (torch.as_tensor(v) if isinstance(v, np.ndarray) else v) for k, v in data["model"].items()}
        return data

    def load(self, path: str, checkpointables=None) -> Dict[str, Any]:
        if path and not os.path.isfile(path) and "://" not in path:
            raise FileNotFoundError(
                f"Checkpoint {path!r} does not exist. Check train.init_checkpoint (or the output "
                "folder's last_checkpoint when resuming)."
            )
        return super().load(path, checkpointables=checkpointables)

    def _unwrapped_model(self) -> torch.nn.Module:
        model = self.model
        if isinstance(model, DistributedDataParallel):
            model = model.module
        return model

    def resume_or_load(self, path: str, *, resume: bool = True, strict: bool = False, config_file: str = "",
                       skip_class_heads: bool = False) -> Dict[str, Any]:
        """Resume from the newest checkpoint of ``save_dir`` (``resume=True`` and one exists:
        model, checkpointables and extra data such as ``iteration``), or else load ``path`` into
        the model only. Returns the extra data of the checkpoint.

        ``path`` loads with :func:`tprd.checkpoint.load_init_state_dict`: ``strict=True`` (evaluation)
        refuses missing model keys and shape mismatches; otherwise (training init) partial loads are
        reported in one line and refused under 10 % loaded or on shape mismatches (class heads of
        another class count load fresh with ``skip_class_heads``). ``config_file`` is named in the
        errors. Models with their own ``load_init_checkpoint`` (the Distiller) apply their policy.
        """
        if resume and self.has_checkpoint():
            latest = self.get_checkpoint_file()
            self.logger.info(f"Resuming from {latest}")
            return self.load(latest)
        if resume:
            self.logger.info(f"--resume: no checkpoint in {self.save_dir!r}; starting from train.init_checkpoint.")
        if not path:
            self.logger.info("No checkpoint given (train.init_checkpoint is empty): training from scratch.")
            return {}
        if not os.path.isfile(path):
            raise FileNotFoundError(f"train.init_checkpoint {path!r} does not exist.")
        from tprd.checkpoint import load_init_state_dict, read_checkpoint

        model = self._unwrapped_model()
        if hasattr(model, "load_init_checkpoint"):
            # Models with their own loading policy (the Distiller: teacher complete, student
            # backbone complete, the rest of the student may be fresh) load the file themselves.
            self.logger.info(f"Loading {path} with {type(model).__name__}.load_init_checkpoint")
            from tprd.checkpoint import CheckpointMismatchError

            try:
                report = model.load_init_checkpoint(path)
            except CheckpointMismatchError as e:
                what = type(model).__name__ + (f" of config {config_file}" if config_file else "")
                raise CheckpointMismatchError(
                    f"{e}\ntrain.init_checkpoint {path} does not fit {what}, which needs a complete teacher "
                    "and a complete student backbone (a merge_weight.py file or a distiller's checkpoint)"
                ) from None
            if strict:
                _check_complete_student(report, path, type(model).__name__, config_file)
            return {}
        data = self._load_file(path)
        from tprd.checkpoint.detrex import adapter_for

        adapter = adapter_for(model, default=None)  # a family's own nesting (RT-DETR: ema.module first)
        weights = adapter.read(data) if adapter is not None else read_checkpoint(data)
        load_init_state_dict(model, weights, source=path, strict=strict, config_file=config_file,
                             skip_class_heads=skip_class_heads)
        return {k: v for k, v in data.items() if k != "model"}


def _check_complete_student(report: Dict[str, Any], path: str, model_name: str, config_file: str) -> None:
    """Evaluation of a distiller runs its student: every student tensor must have loaded."""
    missing = list(report.get("student_missing") or [])
    if not missing:
        return
    from tprd.checkpoint import CheckpointMismatchError

    shown = ", ".join(missing[:20]) + (f" ... (+{len(missing) - 20} more)" if len(missing) > 20 else "")
    what = model_name + (f" of config {config_file}" if config_file else "")
    raise CheckpointMismatchError(
        f"student tensors missing from {path} ({len(missing)}): {shown}\n"
        f"--eval-only refused checkpoint {path} for {what}: {len(missing)} student tensors missing; it is a "
        "distillation init file (merge_weight.py output) rather than a trained distiller's checkpoint"
    )
