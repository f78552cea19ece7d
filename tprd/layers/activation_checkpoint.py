"""Activation checkpointing of transformer layers (``use_checkpoint``, as detrex's DINO offers).

A checkpointed layer keeps only its inputs during the forward pass and runs again inside backward
to rebuild what its gradients need: less memory for one more forward per layer. The recompute is
exact: ``torch.utils.checkpoint`` with ``preserve_rng_state=True`` replays the same dropout masks,
and ``use_reentrant=False`` supports keyword arguments, outputs that do not need gradients and
inputs that do not require grad.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["run_layer", "set_layer_options"]


def run_layer(layer: nn.Module, *args: Any, use_checkpoint: bool = False, **kwargs: Any) -> Any:
    """``layer(*args, **kwargs)``, checkpointed when ``use_checkpoint`` and gradients are being
    recorded (no-grad evaluation runs the layer plainly)."""
    if use_checkpoint and torch.is_grad_enabled():
        return checkpoint(layer, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)
    return layer(*args, **kwargs)


def set_layer_options(model: nn.Module, use_checkpoint: Optional[bool] = None,
                      msda_backend: Optional[str] = None) -> None:
    """Set ``use_checkpoint`` on every encoder/decoder of ``model`` (modules with that attribute)
    and, when given, ``msda_backend`` on every deformable-attention module (``None``: unchanged)."""
    from .ms_deform_attn import MultiScaleDeformableAttention, check_msda_backend

    if msda_backend is not None:
        check_msda_backend(msda_backend)
    for module in model.modules():
        if use_checkpoint is not None and hasattr(module, "use_checkpoint"):
            module.use_checkpoint = bool(use_checkpoint)
        if msda_backend is not None and isinstance(module, MultiScaleDeformableAttention):
            module.msda_backend = msda_backend
