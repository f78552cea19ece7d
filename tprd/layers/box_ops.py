"""Box conversions, IoU and GIoU: the one implementation used everywhere in the toolbox.

Boxes are ``(..., 4)`` tensors. ``cxcywh`` is (centre x, centre y, width, height); ``xyxy`` is
(x0, y0, x1, y1). IoU is ``inter / (union + 1e-6)`` and GIoU is
``IoU - (hull - union) / (hull + 1e-6)``, exactly as detrex computes them (its ``box_iou`` and
``generalized_box_iou``; the paired forms are their diagonals). The epsilons matter for tiny boxes:
with DINO KD-DETR's raw general reference points (areas down to ~1e-6) an IoU without it differs by
up to 0.7 % (docs/parity.md, "Parity with the reference distillers").
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "box_cxcywh_to_xyxy",
    "box_xyxy_to_cxcywh",
    "box_area",
    "box_iou",
    "generalized_box_iou",
    "paired_box_iou",
    "paired_generalized_box_iou",
    "inverse_sigmoid",
]

GIOU_EPS = 1e-6  # added to the hull area in GIoU, as detrex does
IOU_EPS = 1e-6  # added to the union in IoU (and so in GIoU), as detrex does


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """Area of ``xyxy`` boxes, shape ``(...)``."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _inter_union(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    # a and b broadcast against each other; both xyxy.
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a) + box_area(b) - inter
    return inter, union


def _hull_area(a: Tensor, b: Tensor) -> Tensor:
    lt = torch.minimum(a[..., :2], b[..., :2])
    rb = torch.maximum(a[..., 2:], b[..., 2:])
    wh = (rb - lt).clamp(min=0)
    return wh[..., 0] * wh[..., 1]


def box_iou(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    """Pairwise IoU of ``xyxy`` boxes ``[N,4]`` x ``[M,4]`` -> ``(iou [N,M], union [N,M])``.

    Leading batch dimensions are supported: ``[...,N,4]`` x ``[...,M,4]`` -> ``[...,N,M]``.
    """
    inter, union = _inter_union(boxes1.unsqueeze(-2), boxes2.unsqueeze(-3))
    return inter / (union + IOU_EPS), union


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise GIoU of ``xyxy`` boxes ``[...,N,4]`` x ``[...,M,4]`` -> ``[...,N,M]``."""
    a, b = boxes1.unsqueeze(-2), boxes2.unsqueeze(-3)
    inter, union = _inter_union(a, b)
    hull = _hull_area(a, b)
    return inter / (union + IOU_EPS) - (hull - union) / (hull + GIOU_EPS)


def paired_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of aligned ``xyxy`` boxes (same or broadcastable shape ``[...,4]``) -> ``[...]``."""
    inter, union = _inter_union(boxes1, boxes2)
    return inter / (union + IOU_EPS)


def paired_generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """GIoU of aligned ``xyxy`` boxes ``[...,4]`` -> ``[...]``."""
    inter, union = _inter_union(boxes1, boxes2)
    hull = _hull_area(boxes1, boxes2)
    return inter / (union + IOU_EPS) - (hull - union) / (hull + GIOU_EPS)


def inverse_sigmoid(x: Tensor, eps: float = 1e-3) -> Tensor:
    """``log(x / (1 - x))`` with ``x`` clamped to ``[0, 1]`` and both terms clamped below by ``eps``."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))
