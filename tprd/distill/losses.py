"""Shared prediction-level distillation losses (docs/methods.md#b4, #b5) and the KL helper.

All functions treat the teacher tensors as constants (they are detached here, so callers may pass
teacher outputs that still carry a graph, e.g. CrossKD). Boxes are normalised ``cxcywh``.

* :func:`kl_div_logits` -- row-wise ``KL(softmax(t) || softmax(s))`` from logits, stable at
  saturation (0·log 0 = 0, no ``exp`` of differences).
* :func:`soft_bce_pair_losses` -- B4, soft-label BCE + L1 + GIoU on a list of aligned pairs;
  returns **sums** (the caller divides by its method-specific normaliser) or per-pair terms.
* :func:`kd_detr_weighted_losses` -- B5, KD-DETR's confidence-weighted distillation of an
  index-aligned query group; accepts a per-query class-loss override (TPRD-CKD in KD-DETR_TPRD).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from tprd.layers.box_ops import box_cxcywh_to_xyxy, paired_generalized_box_iou

__all__ = [
    "kl_div_log_probs",
    "kl_div_logits",
    "box_pair_losses",
    "soft_bce_pair_losses",
    "kd_detr_weighted_losses",
]


def _at_least_float32(x: Tensor) -> Tensor:
    """Half/bfloat16 tensors are upcast to float32 for losses; float32/float64 are kept."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def kl_div_log_probs(log_r: Tensor, log_p: Tensor, dim: int = -1) -> Tensor:
    """``Σ_dim r·(log r − log p)`` from log-probabilities; entries with ``r = 0`` contribute 0.

    ``log_r`` is the target (teacher) distribution, ``log_p`` the prediction. Entries where
    ``log_r = -inf`` (an exactly zero teacher probability) are dropped instead of producing
    ``0·(−inf) = NaN``; gradients of the dropped entries are zero.
    """
    zero_mass = torch.isneginf(log_r)
    safe_log_r = torch.where(zero_mass, torch.zeros_like(log_r), log_r)
    safe_log_p = torch.where(zero_mass, torch.zeros_like(log_p), log_p)
    terms = safe_log_r.exp() * (safe_log_r - safe_log_p)
    return torch.where(zero_mass, torch.zeros_like(terms), terms).sum(dim)


def kl_div_logits(teacher_logits: Tensor, student_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Row-wise ``KL(softmax(t/T) || softmax(s/T))`` over the last dim, shape ``[...]``.

    No ``T²`` factor here (callers add it). Computed with ``log_softmax`` only, so logits of
    magnitude 1e4 or large student/teacher differences stay finite.
    """
    s = _at_least_float32(student_logits) / temperature
    t = teacher_logits.detach().to(s.dtype) / temperature
    return kl_div_log_probs(F.log_softmax(t, dim=-1), F.log_softmax(s, dim=-1))


def box_pair_losses(s_boxes: Tensor, t_boxes: Tensor) -> tuple[Tensor, Tensor]:
    """Per-pair ``(Σ_4 |b_s − b_t|, 1 − GIoU(b_s, b_t))`` for aligned cxcywh boxes ``[...,4]``.

    No clamping of the student box (docs/methods.md#b4). Returns two tensors of shape ``[...]``.
    """
    t_boxes = t_boxes.detach()
    l1 = (s_boxes - t_boxes).abs().sum(-1)
    giou = paired_generalized_box_iou(box_cxcywh_to_xyxy(s_boxes), box_cxcywh_to_xyxy(t_boxes))
    return l1, 1.0 - giou


def soft_bce_pair_losses(
    s_logits: Tensor,
    t_logits: Tensor,
    s_boxes: Tensor,
    t_boxes: Tensor,
    reduction: str = "sum",
) -> Dict[str, Tensor]:
    """B4 soft-BCE prediction distillation of aligned pairs (row ``i`` of student ↔ row ``i`` of
    teacher).

    Args:
        s_logits, t_logits: ``[P, C]`` class logits (sigmoid heads).
        s_boxes, t_boxes: ``[P, 4]`` normalised cxcywh boxes.
        reduction: ``"sum"`` (default) returns scalar sums over all pairs; ``"none"`` returns the
            per-pair terms ``[P]``.

    Returns:
        ``{"class": Σ_pairs Σ_c BCEwithLogits(z_s; σ(z_t)), "l1": Σ_pairs Σ_4 |b_s − b_t|,
        "giou": Σ_pairs (1 − GIoU)}``. With ``reduction="sum"`` the caller divides each term by
        its method-specific normaliser (DETRDistill / D³ETR: ``B·N``). Empty pair lists give
        zeros that keep the student graph.
    """
    if reduction not in ("sum", "none"):
        raise ValueError(f"reduction must be 'sum' or 'none', got {reduction!r}")
    target = t_logits.detach().sigmoid()
    cls = F.binary_cross_entropy_with_logits(s_logits, target.to(s_logits.dtype), reduction="none").sum(-1)
    l1, giou = box_pair_losses(s_boxes, t_boxes)
    out = {"class": cls, "l1": l1, "giou": giou}
    if reduction == "sum":
        out = {k: v.sum() for k, v in out.items()}
    return out


def kd_detr_weighted_losses(
    s_logits: Tensor,
    t_logits: Tensor,
    s_boxes: Tensor,
    t_boxes: Tensor,
    temperature: float = 10.0,
    class_loss: Optional[Tensor] = None,
) -> Dict[str, Tensor]:
    """B5 KD-DETR weighted distillation of an index-aligned group (student q ↔ teacher q).

    Args:
        s_logits, t_logits: ``[B, Q, C]``, or ``[L, B, Q, C]`` (any leading dims) for all stages at
            once. ``t_logits`` also defines the point weights ``w = σ(max_c t)`` (in KD-DETR_TPRD
            pass the *refined* teacher logits).
        s_boxes, t_boxes: ``[..., B, Q, 4]`` normalised cxcywh.
        temperature: ``T`` of the class KL; the KL is multiplied by ``T²``.
        class_loss: optional per-query class loss ``[..., B, Q]`` that replaces the ``T²·KL`` term
            (TPRD-CKD per query in KD-DETR_TPRD); it is weighted exactly like the default term.

    Returns:
        ``{"class", "l1", "giou"}``, each ``(1/B)·Σ_b Σ_q ŵ_{b,q}·ℓ(b,q)`` with the per-image
        normalised weights ``ŵ = w / Σ_q w``: scalars for ``[B,Q,C]`` inputs, shape ``[L]`` (the
        leading dims) otherwise.
    """
    if s_logits.dim() < 3 or s_logits.shape != t_logits.shape:
        raise ValueError(
            f"expected equal [...,B,Q,C] logits, got {tuple(s_logits.shape)} and {tuple(t_logits.shape)}"
        )
    batch = s_logits.shape[-3]
    with torch.no_grad():
        w = _at_least_float32(t_logits.detach()).amax(-1).sigmoid()  # [B, Q]
        w_hat = w / w.sum(-1, keepdim=True)
    if class_loss is None:
        class_loss = (temperature ** 2) * kl_div_logits(t_logits, s_logits, temperature)
    elif class_loss.shape != w_hat.shape:
        raise ValueError(f"class_loss must have shape {tuple(w_hat.shape)}, got {tuple(class_loss.shape)}")
    l1, giou = box_pair_losses(s_boxes, t_boxes)
    denom = max(batch, 1)
    return {
        "class": (w_hat * class_loss).sum((-2, -1)) / denom,
        "l1": (w_hat * l1).sum((-2, -1)) / denom,
        "giou": (w_hat * giou).sum((-2, -1)) / denom,
    }
