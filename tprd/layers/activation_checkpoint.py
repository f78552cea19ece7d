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


#: What ``use_checkpoint`` may say: every layer (``True``), none (``False``), or only the layers of
#: the encoder / the decoder (an encoder layer holds the activations of every image token, a
#: decoder layer those of the queries only, so ``"encoder"`` gets most of the memory cut).
#: ``"encoder_attention"``: in encoders that support it (``"attention"`` in their
#: ``CHECKPOINT_PARTS``: the deformable encoders of Deformable DETR and DINO), only the attention block
#: of each layer is recomputed, keeping the FFN's activations (cheap to keep after the lean dropout,
#: costly to recompute); other encoders checkpoint their whole layers.
CHECKPOINT_CHOICES = (True, False, "encoder", "decoder", "encoder_attention")


def _part(module: nn.Module) -> str:
    name = type(module).__name__.lower()
    return "encoder" if "encoder" in name else "decoder" if "decoder" in name else "other"


def set_layer_options(model: nn.Module, use_checkpoint=None, msda_backend: Optional[str] = None) -> None:
    """Set ``use_checkpoint`` on every encoder/decoder of ``model`` (modules with that attribute):
    ``True`` / ``False`` for all of them, ``"encoder"`` or ``"decoder"`` for those of that part
    only; and, when given, ``msda_backend`` on every deformable-attention module (``None``:
    unchanged)."""
    from .ms_deform_attn import MultiScaleDeformableAttention, check_msda_backend

    if msda_backend is not None:
        check_msda_backend(msda_backend)
    if isinstance(use_checkpoint, str) and use_checkpoint.lower() in ("true", "false"):
        use_checkpoint = use_checkpoint.lower() == "true"
    if use_checkpoint is not None and not (isinstance(use_checkpoint, bool) or use_checkpoint in CHECKPOINT_CHOICES):
        raise ValueError("use_checkpoint must be one of True, False, 'encoder', 'decoder', 'encoder_attention'; "
                         f"got {use_checkpoint!r}")
    for module in model.modules():
        if use_checkpoint is not None and hasattr(module, "use_checkpoint"):
            if isinstance(use_checkpoint, bool):
                module.use_checkpoint = use_checkpoint
            elif use_checkpoint == "encoder_attention":
                attention = "attention" in getattr(module, "CHECKPOINT_PARTS", ())
                module.use_checkpoint = _part(module) == "encoder" and ("attention" if attention else True)
            else:
                module.use_checkpoint = _part(module) == use_checkpoint
        if msda_backend is not None and isinstance(module, MultiScaleDeformableAttention):
            module.msda_backend = msda_backend
