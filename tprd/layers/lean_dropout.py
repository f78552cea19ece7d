"""Dropout that keeps less for backward: the same outputs, the same random draws, the same gradients.

On CPU, ``F.dropout`` multiplies by a float noise tensor (0 or ``1/(1-p)``) and autograd keeps that
tensor for backward: 4 bytes per element. In an encoder layer, whose activations cover every image
token, these tensors are a large share of a training step's memory. Two replacements:

* :func:`dropout` draws the noise exactly as ``F.dropout`` does on CPU (same generator calls, same
  output bits) but keeps a 1-byte mask; backward multiplies by ``mask * scale``, which is the
  noise. Elsewhere (CUDA, where ``F.dropout`` already keeps a byte mask; evaluation; ``p`` of 0 or
  1) it is ``F.dropout``.
* :func:`relu_dropout` is ``dropout(relu(x))`` for the FFN's hidden layer, keeping only its output
  ``y``. Backward needs where ``relu`` passed and where the mask kept: both are ``y > 0`` (a kept
  positive value stays positive after scaling; a dropped or non-positive one is 0), and where the
  mask kept, the noise is ``scale``. The following linear layer keeps ``y`` anyway, so the hidden
  layer costs one tensor instead of three (relu output, noise, dropout output).

Gradients equal autograd's of the plain expressions bit for bit on CPU (the products are the same
floats), tested in ``tests/test_lean_dropout.py``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Dropout", "ReLUDropout", "dropout", "relu_dropout", "set_lean_dropout"]

_ENABLED = True


def set_lean_dropout(enabled: bool) -> None:
    """Use the lean paths (default) or the plain ``F.dropout`` expressions (benchmarks compare)."""
    global _ENABLED
    _ENABLED = bool(enabled)


def _scale(p: float, like: Tensor) -> Tensor:
    """``1/(1-p)`` computed as ATen's CPU dropout computes its noise value (a 0-dim tensor)."""
    return torch.ones((), dtype=like.dtype, device=like.device).div_(1 - p)


class _CPUDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, p: float) -> Tensor:
        # The draw of ATen's CPU dropout: a noise tensor like the input, bernoulli(1-p), divided by 1-p.
        noise = torch.empty_like(x).bernoulli_(1 - p)
        mask = noise.bool()
        noise.div_(1 - p)
        ctx.p = p
        ctx.save_for_backward(mask)
        return x * noise

    @staticmethod
    def backward(ctx, grad: Tensor):
        (mask,) = ctx.saved_tensors
        return grad * (mask.to(grad.dtype) * _scale(ctx.p, grad)), None


class _ReLUDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, p: float) -> Tensor:
        y = F.dropout(F.relu(x), p, True)
        ctx.p = p
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        (y,) = ctx.saved_tensors
        scaled = grad * _scale(ctx.p, grad)
        return torch.where(y > 0, scaled, torch.zeros((), dtype=grad.dtype, device=grad.device)), None


def _lean(x: Tensor, p: float, training: bool) -> bool:
    return _ENABLED and training and 0.0 < p < 1.0 and torch.is_grad_enabled() and x.requires_grad


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """``F.dropout(x, p, training)``, keeping a byte mask instead of a float noise on CPU."""
    if _lean(x, p, training) and x.device.type == "cpu" and not torch.jit.is_tracing():
        return _CPUDropout.apply(x, p)
    return F.dropout(x, p, training)


def relu_dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """``F.dropout(F.relu(x), p, training)``, keeping only the output for backward."""
    if _lean(x, p, training) and not torch.jit.is_tracing():
        return _ReLUDropout.apply(x, p)
    return F.dropout(F.relu(x), p, training)


class Dropout(torch.nn.Dropout):
    """``nn.Dropout`` through :func:`dropout` (a byte mask kept on CPU)."""

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)


class ReLUDropout(torch.nn.Dropout):
    """``relu`` then dropout, through :func:`relu_dropout` (only the output kept)."""

    def forward(self, x: Tensor) -> Tensor:
        return relu_dropout(x, self.p, self.training)
