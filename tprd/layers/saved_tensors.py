"""When the toolbox may repack what autograd saves for backward (``saved_tensors_hooks``).

:func:`~tprd.layers.ms_deform_attn.saved_as_sum` and
:class:`~tprd.layers.lean_dropout.lean_attention_saves` install saved-tensor hooks around a few
ops. Hooks do not chain (the innermost pair takes every saved tensor), so they are installed only
when no other pair is active: not inside activation checkpointing (``torch.utils.checkpoint``
uses hooks to drop what it recomputes), nor under anybody else's hooks (offloading, ...). The one
exception is an *observer*: an outer pack hook marked ``observer = True`` (the accounting of
``benchmarks/memory_account.py``), which only records what is kept and returns it unchanged; the
toolbox's hooks then stay on and show it every tensor they keep.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

__all__ = ["outer_observer", "may_repack"]


def _top():
    try:
        if not torch._C._autograd._saved_tensors_hooks_is_enabled():
            return False, None
        return True, torch._C._autograd._top_saved_tensors_default_hooks(True)
    except (AttributeError, RuntimeError):  # private API gone: never repack
        return False, None


def may_repack() -> bool:
    """True when no saved-tensor hooks are active, or only an observer's."""
    enabled, top = _top()
    return enabled and (top is None or getattr(top[0], "observer", False))


def outer_observer() -> Optional[Callable]:
    """The observer's pack hook when one is the active pair, else ``None``."""
    enabled, top = _top()
    if enabled and top is not None and getattr(top[0], "observer", False):
        return top[0]
    return None
