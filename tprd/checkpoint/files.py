"""Reading weight files -- the one place that opens a ``.pth`` / ``.pkl`` file -- and writing
them atomically (:func:`atomic_torch_save`: a temporary file next to the target, flushed, then
renamed over it, so a killed write never leaves a partial file).

Every reader of weights (``train.init_checkpoint``, ``--resume`` targets, ``merge_weight.py``,
:func:`tprd.checkpoint.load_detrex_checkpoint`, the tools) goes through :func:`read_weight_file`, so
a file that is not a checkpoint (a text file, an HTML error page saved under a ``.pth`` name, a copy
that was cut off) always ends in the same :class:`CheckpointFileError`, naming the file and showing
its first bytes, instead of a pickle, zip or codec traceback.

Formats (docs/methods.md#initial-weights): files ending in ``.pkl`` are pickles read with ``encoding="latin1"``
(detectron2 / Detectron model zoo files, numpy arrays); anything else is read with ``torch.load``
(zip format, or the legacy pickle format). A file that fails its suffix's format is tried in the
other one, so a torch file named ``.pkl`` or a plain pickle named ``.pth`` still loads. Nothing is
unwrapped here: the caller gets the file's top-level mapping as stored.
"""
from __future__ import annotations

import logging
import os
import pickle
import secrets
import zipfile
from typing import Any, Callable, List, Mapping, Tuple, Union

import torch

__all__ = [
    "CheckpointFileError",
    "read_weight_file",
    "check_weight_file",
    "atomic_torch_save",
    "atomic_write_text",
    "remove_leftover_temporary_files",
]

logger = logging.getLogger("tprd.checkpoint")

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


# --------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------
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
