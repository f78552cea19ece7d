"""glibc's malloc settings for CPU training (``train.cpu_mmap_threshold``).

On CPU, a training step allocates and frees many tensors of a few to a few tens of MB. glibc serves a
block from ``mmap`` (returned to the system on free) only above its *mmap threshold*, and by default
it raises that threshold to the size of the largest block freed so far (up to 32 MB on 64-bit). So
after the first step the 4-32 MB activations of a deformable encoder land in the heap, whose freed
holes are kept, not returned: the process's peak RSS ends up 0.5-0.7 GB above the bytes actually
live (measured in ``benchmarks/msda_steps.md``). Fixing the threshold (``mallopt(M_MMAP_THRESHOLD)``,
the in-process form of the ``MALLOC_MMAP_THRESHOLD_`` environment variable) stops the raising: every
block at or above it is mapped and unmapped on its own, so the peak follows the live bytes, at the
price of the kernel zeroing those pages again on every allocation (system time).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
from typing import Optional

__all__ = ["M_MMAP_THRESHOLD", "set_mmap_threshold"]

M_MMAP_THRESHOLD = -3  # glibc's <malloc.h>
_MAX_THRESHOLD = 32 * 1024 * 1024  # glibc's HEAP_MAX_SIZE / 2 on 64-bit: larger values are refused

logger = logging.getLogger(__name__)


def _libc() -> Optional[ctypes.CDLL]:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt  # noqa: B018 -- present in glibc only (musl, macOS and Windows have none)
        libc.gnu_get_libc_version  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def set_mmap_threshold(nbytes: Optional[int]) -> bool:
    """Fix glibc's mmap threshold at ``nbytes`` for this process (``None``: leave glibc's default).

    Returns True when the setting was applied. Off glibc (macOS, Windows, musl) it logs one line and
    returns False: the setting is a glibc one and has no counterpart there. A value outside
    ``0 .. 32 MiB`` raises ``ValueError`` naming the config key.
    """
    if nbytes is None:
        return False
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or not 0 <= nbytes <= _MAX_THRESHOLD:
        raise ValueError(
            f"train.cpu_mmap_threshold={nbytes!r}: expected None (glibc's default) or a number of "
            f"bytes from 0 to {_MAX_THRESHOLD} (32 MiB), e.g. 4194304 for 4 MiB")
    libc = _libc()
    if libc is None:
        logger.info("train.cpu_mmap_threshold is a glibc setting; this C library has none, ignored.")
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    if libc.mallopt(M_MMAP_THRESHOLD, int(nbytes)) != 1:
        logger.warning(f"glibc refused mallopt(M_MMAP_THRESHOLD, {nbytes}); train.cpu_mmap_threshold ignored.")
        return False
    return True
