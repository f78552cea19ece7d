"""Errors in what the user gave: files, folders, config values, data, hardware.

Every entry point (``tprd.engine.main.run``, ``merge_weight.py``, the tools) reports a
:class:`UserError` -- or one of the other user-error types listed in
:data:`tprd.engine.defaults.USER_ERRORS` -- as one line ``error: <message>`` and exit code 2,
without a traceback (``--debug`` or ``TPRD_DEBUG=1`` shows it). Any other exception is a bug and
keeps its traceback. A message names the file or config key at fault and says how to fix it.

The classes derive from the built-in types the code raised before (``ValueError``, ``OSError``,
``RuntimeError``), so ``except ValueError`` keeps working.
"""
from __future__ import annotations

__all__ = ["UserError", "DatasetError", "ImageDecodeError", "DeviceError", "SetupError", "MissingEntryError", "DEBUG_ENV"]

#: Set to 1 to get the traceback of a user error (also ``--debug`` on the command line).
DEBUG_ENV = "TPRD_DEBUG"


class UserError(ValueError):
    """A mistake in the user's files, folders, values, data or hardware (one-line report)."""


class DatasetError(UserError):
    """A dataset that cannot be used as it is (json that does not parse, unknown ids, missing images)."""


class ImageDecodeError(UserError, OSError):
    """An image file that is missing or does not decode. Takes one message argument, so the torch
    DataLoader can re-raise it in the main process."""


class DeviceError(UserError, RuntimeError):
    """The requested device is not available (``train.device=cuda`` on a machine without CUDA)."""


class SetupError(UserError, RuntimeError):
    """A training or distillation set-up that would run but give a wrong result (no teacher weights,
    a resumed run with another model, a negative loss weight)."""


class MissingEntryError(UserError, KeyError):
    """A file lacks an entry the config asks for (a checkpoint without ``ema``); a ``KeyError`` too."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""
