"""detrex interop, one adapter per detector, found through one registry.

Everything that knows detrex -- building our detector from a detrex LazyConfig, renaming checkpoint
keys both ways, laying out parity intermediates -- lives in an adapter (:class:`DetrexAdapter`), one
module per detector: :mod:`.deformable_detr`, :mod:`.dab_detr`, :mod:`.dino`, and :mod:`.rt_detr`
(RT-DETRv2, whose official keys are ours). The detector files of
:mod:`tprd.modeling` know nothing of detrex.

:data:`ADAPTERS` maps a detector family (``DETRDetector.family``) to its adapter; every consumer
(checkpoint loading, the distiller's init files, student extraction, the parity harness, the
tools) asks this registry instead of testing the detector:

* :func:`adapter_for` -- by a model, a model class or a family name;
* :func:`adapter_for_config` -- by the ``_target_`` of a detrex config;
* :func:`adapter_for_keys` -- by the keys of a state dict (in either naming);
* :func:`load_detrex_checkpoint` -- read, rename and load strictly, reporting every key.

A new detector registers by adding an instance of its adapter to :data:`_BUILTIN` below (its
place there is the order in which :func:`adapter_for_keys` tries the signatures).
"""
from __future__ import annotations

import os
import re
from typing import Any, Dict, Mapping, Optional, Type, Union

from torch import nn

from ..state_dict import LoadReport, StateSource, load_state_dict_checked, read_checkpoint
from .common import DetrexAdapter
from .dab_detr import DABDETRAdapter
from .deformable_detr import DeformableDETRAdapter
from .dino import DINOAdapter
from .rt_detr import RTDETRAdapter

__all__ = [
    "DetrexAdapter",
    "ADAPTERS",
    "adapter_for",
    "adapter_for_config",
    "adapter_for_keys",
    "load_detrex_checkpoint",
]

# Registry order is the order :func:`adapter_for_keys` tries the signatures in: Deformable DETR's
# keys (level embeddings, two-stage proposals) are a subset of DINO's, so it comes last.
_BUILTIN = (RTDETRAdapter(), DINOAdapter(), DABDETRAdapter(), DeformableDETRAdapter())

#: detector family -> its adapter (the one registry)
ADAPTERS: Dict[str, DetrexAdapter] = {a.family: a for a in _BUILTIN}


def _family_of(what: Union[str, nn.Module, Type[nn.Module]]) -> Optional[str]:
    if isinstance(what, str):
        return what
    return getattr(what, "family", None)  # a DETRDetector's declared family (class attribute)


def adapter_for(what: Union[str, nn.Module, Type[nn.Module]], default: Any = KeyError) -> DetrexAdapter:
    """The adapter of a family name, a detector or a detector class. An unknown one: ``KeyError``
    naming the known families, or ``default`` when given (e.g. ``None``)."""
    family = _family_of(what)
    adapter = ADAPTERS.get(family) if family else None
    if adapter is None:
        if default is not KeyError:
            return default
        name = what if isinstance(what, str) else (what if isinstance(what, type) else type(what)).__name__
        raise KeyError(f"no detrex adapter for {name!r}; known detector families: {', '.join(ADAPTERS)}")
    return adapter


def _normalise(name: str) -> str:
    return name.rsplit(".", 1)[-1].lower().replace("_", "")


def adapter_for_config(cfg: Mapping[str, Any]) -> DetrexAdapter:
    """The adapter whose :attr:`~DetrexAdapter.detrex_targets` names the class of ``cfg["_target_"]``."""
    target = str(cfg.get("_target_", ""))
    for adapter in ADAPTERS.values():
        if _normalise(target) in {_normalise(t) for t in adapter.detrex_targets}:
            return adapter
    known = sorted(t for a in ADAPTERS.values() for t in a.detrex_targets)
    raise ValueError(f"no tprd model for detrex target {target!r}; known: {known}")


def adapter_for_keys(keys) -> Optional[DetrexAdapter]:
    """The first adapter (registry order) whose signature matches the keys of a state dict, in our
    naming or detrex's; ``None`` when none does."""
    joined = "\n".join(keys)
    for adapter in ADAPTERS.values():
        if re.search(adapter.signature, joined, re.M):
            return adapter
    return None


def load_detrex_checkpoint(model: nn.Module, path_or_state_dict: StateSource, strict: bool = True) -> LoadReport:
    """Load a detrex checkpoint into ``model`` through its family's adapter; ``strict``: any missing
    or unexpected key or shape mismatch is an error naming the keys."""
    adapter = adapter_for(model, default=None)
    if adapter is None:
        raise TypeError(f"{type(model).__name__} has no detrex adapter (known families: {', '.join(ADAPTERS)}); "
                        "cannot load detrex weights")
    source = "" if isinstance(path_or_state_dict, Mapping) else os.fspath(path_or_state_dict)
    state_dict = adapter.to_ours(adapter.read(path_or_state_dict))
    return load_state_dict_checked(model, state_dict, strict=strict, source=source)
