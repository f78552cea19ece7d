"""Crash-safe checkpointing on top of fvcore's ``Checkpointer``.

:class:`DetectionCheckpointer` adds to fvcore's checkpointer:

* atomic saves: the checkpoint is written to a hidden temporary file in the same folder, flushed
  to disk and renamed over the final name (``os.replace``), then ``last_checkpoint`` is rewritten
  the same way. A Ctrl-C or kill at any moment leaves either the old or the new file, never a
  truncated one, and ``last_checkpoint`` only ever names a complete file; files get the usual
  permissions (0o666 minus the umask); :func:`remove_leftover_temporary_files` deletes the
  temporary files of writes killed by SIGKILL (done at the start of every training run);
* saving only on the main process (all processes may call :meth:`save`);
* reading ``.pkl`` files (pickled state dicts, numpy arrays) next to torch files;
* :meth:`resume_or_load`: resume = the newest checkpoint of the output folder with optimizer,
  scheduler, grad scaler and iteration; otherwise ``train.init_checkpoint`` into the model only,
  non-strictly, with a report of missing / unexpected / mis-shaped keys. Official detrex
  checkpoints of a plain detector (a model with ``convert_detrex_state_dict``) go through
  :func:`tprd.checkpoint.load_detrex_checkpoint`.
"""
from __future__ import annotations

import logging
import os
import pickle
import secrets
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from fvcore.common.checkpoint import Checkpointer
from torch.nn.parallel import DistributedDataParallel

from . import comm

__all__ = ["DetectionCheckpointer", "atomic_torch_save", "atomic_write_text", "remove_leftover_temporary_files"]

logger = logging.getLogger("tprd.checkpoint")


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


#: Temporary files of interrupted atomic writes: ``.<final name>.<random>.tmp`` next to the file.
_TMP_PREFIX, _TMP_SUFFIX = ".", ".tmp"


def _create_temporary(path: str) -> Tuple[int, str]:
    """A new, empty hidden file next to ``path``, opened for writing: ``(fd, name)``.

    Created with mode 0o666 minus the umask, like any file Python opens for writing (so a
    checkpoint is 0644 under umask 022), unlike ``tempfile.mkstemp`` which always gives 0600.
    """
    directory, base = os.path.split(os.path.abspath(path))
    while True:
        tmp = os.path.join(directory, f"{_TMP_PREFIX}{base}.{secrets.token_hex(4)}{_TMP_SUFFIX}")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:  # pragma: no cover - 32 random bits collided
            continue


def _atomic_write(path: str, write_fn) -> None:
    """Write through ``write_fn(file)`` to a temporary file next to ``path``, then rename."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = _create_temporary(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # Also on KeyboardInterrupt: never leave the partial temporary file behind.
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(directory)


def remove_leftover_temporary_files(directory: str) -> List[str]:
    """Delete the temporary files that killed atomic writes left in ``directory``; return them.

    A SIGKILL (or a power cut) during a save cannot run the clean-up of :func:`_atomic_write`,
    so its ``.<name>.<random>.tmp`` file (up to a whole checkpoint) would stay forever. Call this
    when no write into ``directory`` is in progress (start of a run, ``--resume``).
    """
    if not directory or not os.path.isdir(directory):
        return []
    removed = []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if name.startswith(_TMP_PREFIX) and name.endswith(_TMP_SUFFIX) and os.path.isfile(path):
            try:
                os.remove(path)
            except OSError as e:
                logger.warning(f"Could not remove the leftover temporary file {path}: {e}")
                continue
            removed.append(path)
    return removed


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save(obj, path)`` that never leaves a partial file at ``path``."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str, text: str) -> None:
    _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


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
        if filename.endswith(".pkl"):
            with open(filename, "rb") as f:
                data = pickle.load(f, encoding="latin1")
            if isinstance(data, dict) and "model" in data:
                data = dict(data)
            else:
                data = {"model": data}
            data["model"] = {
                k: (torch.as_tensor(v) if isinstance(v, np.ndarray) else v) for k, v in data["model"].items()
            }
            return data
        try:
            data = torch.load(filename, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            # Checkpoints written by other tools may hold plain Python objects besides tensors.
            self.logger.info(f"{filename} holds non-tensor objects; loading it with weights_only=False.")
            data = torch.load(filename, map_location="cpu", weights_only=False)
        if not isinstance(data, dict):
            raise ValueError(f"Checkpoint {filename} holds a {type(data).__name__}, expected a dict.")
        if "model" not in data:
            if "state_dict" in data and isinstance(data["state_dict"], dict):
                data = {"model": data["state_dict"]}
            else:
                data = {"model": data}
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

    def resume_or_load(self, path: str, *, resume: bool = True) -> Dict[str, Any]:
        """Resume from the newest checkpoint of ``save_dir`` (``resume=True`` and one exists:
        model, checkpointables and extra data such as ``iteration``), or else load ``path`` into
        the model only (non-strict, reported). Returns the extra data of the checkpoint."""
        if resume and self.has_checkpoint():
            latest = self.get_checkpoint_file()
            self.logger.info(f"Resuming from {latest}")
            return self.load(latest)
        if resume:
            self.logger.info(f"--resume: no checkpoint in {self.save_dir!r}; starting from train.init_checkpoint.")
        if not path:
            self.logger.info("No checkpoint given (train.init_checkpoint is empty): training from scratch.")
            return {}
        model = self._unwrapped_model()
        if hasattr(model, "load_init_checkpoint"):
            # Models with their own loading policy (the Distiller: teacher complete, student
            # backbone complete, the rest of the student may be fresh) load the file themselves.
            if not os.path.isfile(path):
                raise FileNotFoundError(f"train.init_checkpoint {path!r} does not exist.")
            self.logger.info(f"Loading {path} with {type(model).__name__}.load_init_checkpoint")
            model.load_init_checkpoint(path)
            return {}
        if self._load_renamed(path):
            return {}
        return self.load(path, checkpointables=[])

    def _load_renamed(self, path: str) -> bool:
        """Load ``path`` under other key names when that fits the model better than its own names.

        Candidates, besides the file's own names (loaded by fvcore): the model's
        ``convert_detrex_state_dict`` (official detrex checkpoints of a plain detector), and for
        models with a ``backbone``: the keys prefixed with ``backbone.`` (an ImageNet ResNet file
        from torchvision, ``fc.*`` dropped), also through the converter (detectron2's ``R-50.pkl``).
        The candidate matching the most model keys wins; ties keep the file's own names, so a
        checkpoint written by this toolbox always loads as it is. Returns False for "own names".
        """
        if not os.path.isfile(path):
            return False
        model = self._unwrapped_model()
        convert = getattr(model, "convert_detrex_state_dict", None)
        has_backbone = isinstance(getattr(model, "backbone", None), torch.nn.Module)
        if convert is None and not has_backbone:
            return False
        from tprd.checkpoint import load_state_dict_checked, read_checkpoint

        raw = read_checkpoint(path)
        own = set(model.state_dict().keys())
        candidates = []
        if convert is not None:
            candidates.append(("detrex naming", lambda: convert(raw)))
        if has_backbone and not any(k.startswith("backbone.") for k in raw):
            prefixed = {f"backbone.{k}": v for k, v in raw.items() if not k.startswith("fc.")}
            candidates.append(("a backbone-only checkpoint", lambda: prefixed))
            if convert is not None:
                candidates.append(("a detectron2-named backbone checkpoint", lambda: convert(prefixed)))
        best_name, best, best_hits = None, None, len(own & set(raw))
        for name, make in candidates:
            try:
                state_dict = make()
            except Exception as e:  # this naming does not apply to the file
                self.logger.debug(f"{name}: conversion of {path} failed: {e}")
                continue
            hits = len(own & set(state_dict))
            if hits > best_hits:
                best_name, best, best_hits = name, state_dict, hits
        if best is None:
            return False
        self.logger.info(f"Loading {path} into {type(model).__name__} as {best_name}")
        report = load_state_dict_checked(model, best, strict=False, source=path)
        if report.ok:
            self.logger.info(report.summary())
        else:
            self.logger.warning(report.summary())
        return True
