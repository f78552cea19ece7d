"""Reading weight files: the one place that opens a ``.pth`` / ``.pkl`` file.

Every reader of weights (``train.init_checkpoint``, ``--resume`` targets, ``merge_weight.py``,
:func:`tprd.checkpoint.load_detrex_checkpoint`, the tools) goes through :func:`read_weight_file`, so
a file that is not a checkpoint (a text file, an HTML error page saved under a ``.pth`` name, a copy
that was cut off) always ends in the same :class:`CheckpointFileError`, naming the file and showing
its first bytes, instead of a pickle, zip or codec traceback.

Formats (spec 1.4): files ending in ``.pkl`` are pickles read with ``encoding="latin1"``
(detectron2 / Detectron model zoo files, numpy arrays); anything else is read with ``torch.load``
(zip format, or the legacy pickle format). A file that fails its suffix's format is tried in the
other one, so a torch file named ``.pkl`` or a plain pickle named ``.pth`` still loads. Nothing is
unwrapped here: the caller gets the file's top-level mapping as stored.
"""
from __future__ import annotations

import os
import pickle
import zipfile
from typing import Any, Callable, List, Mapping, Tuple, Union

import torch

__all__ = ["CheckpointFileError", "read_weight_file", "check_weight_file"]

PathLike = Union[str, os.PathLike]

_EXPECTED = "expected a .pth/.pkl written by torch.save or detectron2"
_HEAD_BYTES = 16


class CheckpointFileError(ValueError):
    """A file given as weights is not a readable checkpoint; the message names the file."""

    def __init__(self, message: str, path: str = ""):
        super().__init__(message)
        self.path = path


def _head(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read(_HEAD_BYTES)


def _torch_load(path: str) -> Any:
    """``torch.load`` on the CPU: tensors-only first; files of other tools may also hold plain
    Python objects (an iteration count, a config), which need the full unpickler."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return torch.load(path, map_location="cpu", weights_only=False)


def _pickle_load(path: str) -> Any:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


def _reason(error: BaseException, head: bytes) -> str:
    """Why loading failed, in words, for the error message."""
    text = str(error).split("\n")[0].strip()
    if not head.startswith((b"PK\x03\x04", b"\x80")):
        return "neither a zip archive as torch.save writes nor a binary pickle"
    if head.startswith(b"PK\x03\x04") and isinstance(error, (RuntimeError, zipfile.BadZipFile)):
        return ("a zip archive without its end, as torch.save writes it: the file looks truncated "
                "(a copy that was cut off?); copy or download it again")
    if isinstance(error, EOFError) or "truncated" in text:
        return "the data ends early: the file looks truncated (a copy that was cut off?); copy or download it again"
    if isinstance(error, ModuleNotFoundError):
        return f"unpickling it needs a Python module that is not installed ({text})"
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def read_weight_file(path: PathLike) -> Mapping[str, Any]:
    """The top-level mapping stored in the weight file ``path`` (on the CPU).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointFileError: ``path`` is a folder, empty, not a torch file or pickle, truncated, or
            holds something other than a mapping. The message names the file, shows its first
            bytes and says what was expected.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    if os.path.isdir(path):
        raise CheckpointFileError(f"{path} is a folder, not a checkpoint file; {_EXPECTED}", path)
    head = _head(path)
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointFileError(f"{path} is not a PyTorch checkpoint or pickle (an empty file); {_EXPECTED}", path)

    loaders: List[Tuple[str, Callable[[str], Any]]] = [("torch.load", _torch_load), ("pickle", _pickle_load)]
    if path.endswith(".pkl") and not head.startswith(b"PK\x03\x04"):
        loaders.reverse()
    first_error = None
    for _, load in loaders:
        try:
            data = load(path)
        except (MemoryError, KeyboardInterrupt):
            raise
        except Exception as e:  # noqa: BLE001 - any failure of the format is reported below
            first_error = first_error or e
            continue
        if isinstance(data, Mapping):
            return data
        first_error = first_error or TypeError(f"it holds a {type(data).__name__}, not a dict of weights")
    raise CheckpointFileError(
        f"{path} is not a PyTorch checkpoint or pickle (starts with {head!r}, {size} bytes; "
        f"{_reason(first_error, head)}); {_EXPECTED}",
        path,
    )


def check_weight_file(path: PathLike) -> None:
    """A quick look at ``path`` before a run sets anything up: the errors of
    :func:`read_weight_file` for a missing, empty or non-checkpoint file or a truncated zip archive,
    without reading the weights (only a file that is neither a zip archive nor a binary pickle is
    read in full, which fails at once for a text file)."""
    path = os.fspath(path)
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        read_weight_file(path)  # raises the missing / folder / empty error
    head = _head(path)
    if head.startswith(b"PK\x03\x04"):
        if not zipfile.is_zipfile(path):
            size = os.path.getsize(path)
            raise CheckpointFileError(
                f"{path} is not a PyTorch checkpoint or pickle (starts with {head!r}, {size} bytes; "
                f"{_reason(RuntimeError('no end of zip archive'), head)}); {_EXPECTED}",
                path,
            )
    elif not head.startswith(b"\x80"):
        read_weight_file(path)
