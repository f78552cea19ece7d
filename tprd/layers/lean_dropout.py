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

A third tool, :func:`lean_attention_saves`, serves ``nn.MultiheadAttention`` (whose attention
dropout is inside its scaled-dot-product core, out of reach of the functions above): a context in
which what autograd saves for backward is repacked, without changing any op it runs. See its
docstring.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Dropout", "ReLUDropout", "dropout", "relu_dropout", "set_lean_dropout", "lean_attention_saves"]

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


# --------------------------------------------------------------------------------------------
# nn.MultiheadAttention: the attention dropout's saved tensors, repacked
# --------------------------------------------------------------------------------------------

_MIN_NUMEL = 1 << 14  # smaller saved tensors are kept as they are (not worth the checks)


class _Noise:
    """A dropout noise (values 0 and ``scale`` only, contiguous) kept as a byte mask and its scale."""

    __slots__ = ("mask", "scale", "dtype")

    def __init__(self, mask: Tensor, scale: Tensor, dtype):
        self.mask, self.scale, self.dtype = mask, scale, dtype

    def tensor(self) -> Tensor:
        return self.mask.to(self.dtype) * self.scale


class _Product:
    """A contiguous ``probs * noise`` kept as its factors (``probs`` is saved by the softmax anyway)."""

    __slots__ = ("probs", "noise", "shape", "version")

    def __init__(self, probs: Tensor, noise: _Noise, shape):
        self.probs, self.noise, self.shape, self.version = probs, noise, shape, probs._version

    def tensor(self) -> Tensor:
        if self.probs._version != self.version:
            raise RuntimeError("attention probabilities saved for backward were modified in place")
        return torch.mul(self.probs, self.noise.tensor().view(self.probs.shape)).view(self.shape)


def _bits_equal(a: Tensor, b: Tensor) -> bool:
    """Equal as bit patterns (``torch.equal`` says ``-0.0 == 0.0``; no NaN expected here)."""
    return torch.equal(a, b) and torch.equal(torch.signbit(a), torch.signbit(b))


def lean_attention_saves():
    """Around a training call of ``nn.MultiheadAttention`` (CPU): keep its attention dropout's noise
    as a byte mask, and the dropped-out probabilities (saved by the product with the values) as the
    softmax output (saved anyway) times that noise, rebuilt in backward.

    On CPU the scaled-dot-product core saves, per layer, three float tensors of the attention's
    shape ``[B, heads, Q, K]``: the softmax output ``P``, the dropout noise ``N`` (0 or
    ``1/(1-p)``) and ``D = P * N`` (for the value gradient). Here ``N`` is kept as a bool mask
    plus its scale and ``D`` as ``(P, N)``: 5 bytes per element kept instead of 12. The forward
    runs the same ops; backward multiplies ``P * N`` again (the size of the softmax; each of the
    attention's two batched matrix products does ``head_dim`` multiply-adds per element of it).
    Exact: a repacked tensor is first rebuilt at pack time and compared bit for bit with the one
    autograd saves (a few element-wise passes over the attention; anything else, or a mismatch, is
    kept as it is), and the rebuild in backward is the same op on the same inputs. Nothing changes with the lean dropout off
    (:func:`set_lean_dropout`), without gradients, or off CPU.
    """
    from .saved_tensors import may_repack, outer_observer

    if not (_ENABLED and torch.is_grad_enabled() and may_repack()):
        return contextlib.nullcontext()
    state = {"probs": None, "noise": None}
    observe = outer_observer() or (lambda t: t)

    def pack(t: Tensor):
        kept = repack(t)
        for x in ((kept.mask,) if isinstance(kept, _Noise) else () if isinstance(kept, _Product) else (kept,)):
            observe(x)
        return kept

    def repack(t: Tensor):
        if not (t.device.type == "cpu" and t.is_floating_point() and t.is_contiguous() and t.numel() >= _MIN_NUMEL):
            return t
        probs, noise = state["probs"], state["noise"]
        if t.requires_grad:
            if noise is not None and probs is not None and t.numel() == probs.numel():
                product = torch.mul(probs, noise.tensor().view(probs.shape))
                if _bits_equal(product.view(-1), t.view(-1)):
                    state["noise"] = state["probs"] = None
                    return _Product(probs, noise, t.shape)
            if noise is None:
                state["probs"] = t  # maybe the softmax output (saved as itself), a factor later
            return t
        if probs is None or t.numel() != probs.numel():
            return t
        mask = t != 0
        scale = t.amax()
        if _bits_equal(mask.to(t.dtype) * scale, t):
            state["noise"] = _Noise(mask, scale, t.dtype)
            return state["noise"]
        return t

    def unpack(packed):
        if isinstance(packed, (_Noise, _Product)):
            return packed.tensor()
        return packed

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)
