"""Turn final-stage predictions into detections (shared by all three detectors).

1. :func:`select_topk`: sigmoid scores, top-``k`` over the flattened ``Q x C`` table of each image
   (a query can appear with several classes), boxes converted to ``xyxy`` pixels of the network
   input (the unpadded image size) -- detrex's ``inference``.
2. :func:`detector_postprocess`: rescale to the requested output size ``(height, width)``, clip to
   it and drop empty boxes -- detectron2's ``detector_postprocess``.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..layers.box_ops import box_cxcywh_to_xyxy

__all__ = ["select_topk", "detector_postprocess", "postprocess"]

Detections = Dict[str, Tensor]


def select_topk(logits: Tensor, boxes: Tensor, image_sizes: Sequence[Tuple[int, int]], k: int) -> List[Detections]:
    """Top-``k`` (score, class, box) of each image.

    ``logits [B,Q,C]``, ``boxes [B,Q,4]`` normalised cxcywh, ``image_sizes`` the ``(h, w)`` boxes are
    scaled to. Returns per image ``{"scores" [k], "labels" [k] int64, "boxes" [k,4] xyxy,
    "queries" [k]}`` in decreasing score order; ``k`` is capped at ``Q*C``.
    """
    bsz, nq, nc = logits.shape
    k = min(int(k), nq * nc)
    prob = logits.sigmoid()
    scores, flat_idx = torch.topk(prob.view(bsz, -1), k, dim=1)
    queries = torch.div(flat_idx, nc, rounding_mode="floor")
    labels = flat_idx % nc
    picked = torch.gather(boxes, 1, queries.unsqueeze(-1).expand(-1, -1, 4))
    xyxy = box_cxcywh_to_xyxy(picked)
    sizes = torch.as_tensor([[w, h, w, h] for h, w in image_sizes], dtype=xyxy.dtype, device=xyxy.device)
    xyxy = xyxy * sizes[:, None, :]
    return [
        {"scores": scores[b], "labels": labels[b], "boxes": xyxy[b], "queries": queries[b]}
        for b in range(bsz)
    ]


def detector_postprocess(
    detections: Detections, image_size: Tuple[int, int], output_height: int, output_width: int
) -> Detections:
    """Rescale ``xyxy`` boxes from ``image_size (h, w)`` to ``(output_height, output_width)``, clip them
    to that frame and drop boxes with zero width or height (detectron2 semantics)."""
    scale_x = output_width / image_size[1]
    scale_y = output_height / image_size[0]
    b = detections["boxes"]
    x0 = (b[:, 0] * scale_x).clamp(min=0, max=output_width)
    y0 = (b[:, 1] * scale_y).clamp(min=0, max=output_height)
    x1 = (b[:, 2] * scale_x).clamp(min=0, max=output_width)
    y1 = (b[:, 3] * scale_y).clamp(min=0, max=output_height)
    boxes = torch.stack([x0, y0, x1, y1], dim=1)
    keep = ((x1 - x0) > 0) & ((y1 - y0) > 0)
    out = {k: v[keep] for k, v in detections.items() if k != "boxes"}
    out["boxes"] = boxes[keep]
    return out


def postprocess(
    logits: Tensor,
    boxes: Tensor,
    image_sizes: Sequence[Tuple[int, int]],
    output_sizes: Optional[Sequence[Tuple[int, int]]] = None,
    k: int = 100,
) -> List[Detections]:
    """:func:`select_topk` then :func:`detector_postprocess` per image; returns
    ``{"boxes", "scores", "labels"}`` per image (``output_sizes`` default: ``image_sizes``)."""
    output_sizes = output_sizes if output_sizes is not None else image_sizes
    results = []
    for det, size, (oh, ow) in zip(select_topk(logits, boxes, image_sizes, k), image_sizes, output_sizes):
        det = detector_postprocess(det, size, oh, ow)
        results.append({"boxes": det["boxes"], "scores": det["scores"], "labels": det["labels"]})
    return results
