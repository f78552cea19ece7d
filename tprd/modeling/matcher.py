"""Hungarian matching between predictions and ground truth with detrex's focal-loss cost.

Per image, the cost of assigning query ``q`` to ground-truth box ``j`` of class ``c_j`` is::

    C[q, j] = cost_bbox * |b_q - g_j|_1 + cost_class * (pos[q, c_j] - neg[q, c_j])
              + cost_giou * (-GIoU(xyxy(b_q), xyxy(g_j)))
    p = sigmoid(logit),  pos = alpha (1-p)^gamma (-log(p + 1e-8)),
                         neg = (1-alpha) p^gamma (-log(1 - p + 1e-8))

and ``scipy.optimize.linear_sum_assignment`` solves each image. The costs of the whole batch (and,
in :meth:`HungarianMatcher.match_stages`, of every decoder stage) are computed in one batched pass
with the ground truth padded to the largest count, then moved to the CPU in one transfer.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from ..layers.box_ops import box_cxcywh_to_xyxy, generalized_box_iou

__all__ = ["HungarianMatcher", "focal_class_cost", "pad_targets"]

Match = Tuple[Tensor, Tensor]


def focal_class_cost(prob: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """``pos - neg`` focal matching cost of every class, from sigmoid probabilities ``[..., C]``."""
    neg = (1 - alpha) * (prob**gamma) * (-(1 - prob + 1e-8).log())
    pos = alpha * ((1 - prob) ** gamma) * (-(prob + 1e-8).log())
    return pos - neg


def pad_targets(targets: Sequence[Dict[str, Tensor]], device=None) -> Tuple[Tensor, Tensor, List[int]]:
    """Stack per-image targets into ``labels [B,G]`` and ``boxes [B,G,4]`` (G = largest count).

    Padding rows get label 0 and a harmless box ``(0.5, 0.5, 0.1, 0.1)``; ``sizes`` gives the true
    counts.
    """
    sizes = [int(t["labels"].shape[0]) for t in targets]
    gmax = max(sizes, default=0)
    if device is None:
        device = targets[0]["boxes"].device if targets else torch.device("cpu")
    bsz = len(targets)
    labels = torch.zeros((bsz, gmax), dtype=torch.int64, device=device)
    dtype = targets[0]["boxes"].dtype if targets else torch.float32
    boxes = torch.tensor([0.5, 0.5, 0.1, 0.1], dtype=dtype, device=device).repeat(bsz, gmax, 1)
    if gmax:
        batch_idx = torch.cat([torch.full((n,), i, dtype=torch.int64) for i, n in enumerate(sizes)]).to(device)
        slot_idx = torch.cat([torch.arange(n) for n in sizes]).to(device)
        labels[batch_idx, slot_idx] = torch.cat([t["labels"] for t in targets]).to(device)
        boxes[batch_idx, slot_idx] = torch.cat([t["boxes"] for t in targets]).to(device, dtype)
    return labels, boxes, sizes


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to ground truth (detrex ``HungarianMatcher``, focal cost).

    ``forward(pred_logits [B,Q,C], pred_boxes [B,Q,4], targets)`` returns, per image,
    ``(pred_idx, gt_idx)`` int64 CPU tensors sorted by query index; images without ground truth
    get two empty tensors. ``targets``: per image ``{"labels" [G] int64, "boxes" [G,4] normalised
    cxcywh}``.
    """

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        alpha: float = 0.25,
        gamma: float = 2.0,
    ):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: all cost weights are 0")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.alpha = alpha
        self.gamma = gamma

    @torch.no_grad()
    def cost_matrix(
        self, pred_logits: Tensor, pred_boxes: Tensor, targets: Sequence[Dict[str, Tensor]]
    ) -> Tuple[Tensor, List[int]]:
        """Costs ``[..., B, Q, G]`` for predictions ``[..., B, Q, C]`` / ``[..., B, Q, 4]`` (any leading
        dims, e.g. stages), with G the largest ground-truth count; columns ``>= sizes[b]`` are padding."""
        labels, gt_boxes, sizes = pad_targets(targets, device=pred_logits.device)
        lead = pred_logits.shape[:-3]
        bsz, nq, _ = pred_logits.shape[-3:]
        gmax = labels.shape[1]
        if gmax == 0:
            return pred_logits.new_zeros(*lead, bsz, nq, 0), sizes
        prob = pred_logits.sigmoid()
        class_cost = focal_class_cost(prob, self.alpha, self.gamma)
        index = labels[:, None, :].expand(*lead, bsz, nq, gmax)
        class_cost = torch.gather(class_cost, -1, index)
        gt = gt_boxes.to(pred_boxes.dtype).expand(*lead, bsz, gmax, 4)
        bbox_cost = torch.cdist(pred_boxes, gt, p=1)
        giou_cost = -generalized_box_iou(box_cxcywh_to_xyxy(pred_boxes), box_cxcywh_to_xyxy(gt))
        cost = self.cost_bbox * bbox_cost + self.cost_class * class_cost + self.cost_giou * giou_cost
        return cost, sizes

    @staticmethod
    def _assign(cost: np.ndarray, sizes: List[int]) -> List[Match]:
        out = []
        for b, n in enumerate(sizes):
            if n == 0:
                empty = torch.empty(0, dtype=torch.int64)
                out.append((empty, empty.clone()))
                continue
            rows, cols = linear_sum_assignment(cost[b, :, :n])
            out.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return out

    @torch.no_grad()
    def forward(self, pred_logits, pred_boxes=None, targets=None) -> List[Match]:
        """Match one set of predictions. Also accepts detrex's call ``matcher(outputs_dict, targets)``."""
        if isinstance(pred_logits, dict):
            pred_logits, pred_boxes, targets = pred_logits["pred_logits"], pred_logits["pred_boxes"], pred_boxes
        cost, sizes = self.cost_matrix(pred_logits, pred_boxes, targets)
        return self._assign(cost.float().cpu().numpy(), sizes)

    @torch.no_grad()
    def match_stages(self, logits: Tensor, boxes: Tensor, targets: Sequence[Dict[str, Tensor]]) -> List[List[Match]]:
        """Match every stage of ``logits [L,B,Q,C]`` / ``boxes [L,B,Q,4]``: one cost computation and
        one CPU transfer for all stages. Returns a list over stages of per-image matches."""
        cost, sizes = self.cost_matrix(logits, boxes, targets)
        cost = cost.float().cpu().numpy()
        return [self._assign(cost[l], sizes) for l in range(cost.shape[0])]

    def extra_repr(self) -> str:
        return (
            f"cost_class={self.cost_class}, cost_bbox={self.cost_bbox}, cost_giou={self.cost_giou}, "
            f"alpha={self.alpha}, gamma={self.gamma}"
        )
