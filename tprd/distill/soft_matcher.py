"""B3 soft Hungarian matcher between student and teacher predictions (docs/methods.md#b3, #tprd-alignment).

Per image, between student query ``n`` and teacher query ``m``::

    cost = w_cls·C_soft + w_L1·‖clip(b_n) − b_m‖₁ − w_GIoU·GIoU(clip(b_n), b_m)
    C_soft(n, m) = Σ_c [BCE(z^s_{n,c}, 1)·q_{m,c} + BCE(z^s_{n,c}, 0)·(1 − q_{m,c})],  q = σ(z^t)

with ``clip`` clamping the student box to ``[0, 1]`` (cost only). Since ``BCE(z, 1) = softplus(−z)``
and ``BCE(z, 0) = softplus(z)``, ``C_soft`` is one batched matrix product
``[softplus(−z^s), softplus(z^s)] @ [q, 1 − q]ᵀ`` -- no ``[Ns, Nt, C]`` tensor is formed.

The costs of every image (and, with :func:`soft_hungarian_match_stages`, every stage) are built at
once on the predictions' device and moved to the CPU in one transfer; scipy's
``linear_sum_assignment`` then runs per image. Results are ``(student_idx, teacher_idx)`` long
tensors sorted by student index (a full permutation when ``Ns == Nt``).
"""
from __future__ import annotations

from typing import List, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from tprd.layers.box_ops import box_cxcywh_to_xyxy, generalized_box_iou

__all__ = [
    "soft_match_cost",
    "soft_hungarian_match",
    "soft_hungarian_match_stages",
    "inverse_permutation",
    "pair_positive_targets",
]

Match = Tuple[Tensor, Tensor]


@torch.no_grad()
def soft_match_cost(s_logits: Tensor, s_boxes: Tensor, t_logits: Tensor, t_boxes: Tensor, cost_class: float = 1.0,
                    cost_bbox: float = 5.0, cost_giou: float = 2.0) -> Tensor:
    """Cost matrices ``[..., Ns, Nt]`` for student ``[..., Ns, C|4]`` vs teacher ``[..., Nt, C|4]``
    (any equal leading dims, e.g. ``[B]`` or ``[L, B]``)."""
    s_logits = s_logits.detach().float()
    q = t_logits.detach().float().sigmoid()
    lhs = torch.cat([F.softplus(-s_logits), F.softplus(s_logits)], -1)  # [..., Ns, 2C]
    rhs = torch.cat([q, 1.0 - q], -1)  # [..., Nt, 2C]
    c_soft = lhs @ rhs.transpose(-1, -2)
    s_box = s_boxes.detach().float().clamp(0.0, 1.0)
    t_box = t_boxes.detach().float()
    c_l1 = torch.cdist(s_box, t_box, p=1)  # no [..., Ns, Nt, 4] intermediate
    c_giou = -generalized_box_iou(box_cxcywh_to_xyxy(s_box), box_cxcywh_to_xyxy(t_box))
    return cost_class * c_soft + cost_bbox * c_l1 + cost_giou * c_giou


def _solve(cost: Tensor, device) -> List[Match]:
    """Hungarian assignment of every matrix in ``cost [X, Ns, Nt]``: one CPU transfer, one
    transfer of the concatenated indices back."""
    mats = cost.cpu().numpy()
    rows, cols, counts = [], [], []
    for mat in mats:
        r, c = linear_sum_assignment(mat)  # rows come back sorted
        rows.append(r)
        cols.append(c)
        counts.append(len(r))
    if not rows:
        return []
    both = torch.from_numpy(np.stack([np.concatenate(rows), np.concatenate(cols)]).astype(np.int64)).to(device)
    return list(zip(both[0].split(counts), both[1].split(counts)))


@torch.no_grad()
def soft_hungarian_match(s_logits: Tensor, s_boxes: Tensor, t_logits: Tensor, t_boxes: Tensor, cost_class: float = 1.0,
                         cost_bbox: float = 5.0, cost_giou: float = 2.0) -> List[Match]:
    """Soft Hungarian matching of one stage.

    Args:
        s_logits ``[B, Ns, C]``, s_boxes ``[B, Ns, 4]``: student predictions (cxcywh).
        t_logits ``[B, Nt, C]``, t_boxes ``[B, Nt, 4]``: teacher predictions (raw or refined).

    Returns:
        ``B`` pairs ``(student_idx, teacher_idx)`` of long tensors on the predictions' device,
        sorted by student index; ``min(Ns, Nt)`` pairs per image.
    """
    if s_logits.dim() != 3 or t_logits.dim() != 3:
        raise ValueError("soft_hungarian_match expects [B,N,C] tensors; use soft_hungarian_match_stages for [L,B,N,C]")
    cost = soft_match_cost(s_logits, s_boxes, t_logits, t_boxes, cost_class, cost_bbox, cost_giou)
    return _solve(cost, s_logits.device)


@torch.no_grad()
def soft_hungarian_match_stages(s_logits: Tensor, s_boxes: Tensor, t_logits: Tensor, t_boxes: Tensor,
                                cost_class: float = 1.0, cost_bbox: float = 5.0,
                                cost_giou: float = 2.0) -> List[List[Match]]:
    """:func:`soft_hungarian_match` for all stages ``[L, B, N, C|4]`` with a single CPU transfer.
    Returns ``matches[l][b] = (student_idx, teacher_idx)``."""
    if s_logits.dim() != 4:
        raise ValueError(f"expected [L,B,N,C] tensors, got shape {tuple(s_logits.shape)}")
    num_stages, batch = s_logits.shape[:2]
    cost = soft_match_cost(s_logits, s_boxes, t_logits, t_boxes, cost_class, cost_bbox, cost_giou)
    flat = _solve(cost.flatten(0, 1), s_logits.device)
    return [flat[l * batch : (l + 1) * batch] for l in range(num_stages)]


def inverse_permutation(teacher_idx: Tensor, num_teacher: int) -> Tensor:
    """Row of the pair list holding each teacher query: ``inv [num_teacher]`` long, −1 for teacher
    queries that are in no pair (``teacher_idx [P]``: teacher query of each pair-list row).

    For a full permutation sorted by student index (``Ns == Nt``), the row *is* the aligned student
    position, so ``inv[m]`` is the student query aligned with teacher query ``m``.
    """
    inv = torch.full((num_teacher,), -1, dtype=torch.long, device=teacher_idx.device)
    inv[teacher_idx.long()] = torch.arange(teacher_idx.numel(), device=teacher_idx.device)
    return inv


def pair_positive_targets(
    teacher_idx: Tensor, num_teacher: int, match: Match, gt_labels: Tensor
) -> Tuple[Tensor, Tensor]:
    """Positive flag and GT class of every row of one image's pair list (docs/methods.md#tprd-alignment, clean variant).

    Args:
        teacher_idx: ``[P]`` teacher query of each pair-list row (e.g. ``π`` from the soft matcher).
        num_teacher: number of teacher queries.
        match: ``(query_idx, gt_idx)``, the teacher–GT match ``M_l`` of this image and stage.
        gt_labels: ``[G]`` class of each GT of this image.

    Returns:
        ``positive [P]`` bool and ``target_class [P]`` long (0 for negatives). Row ``p`` is positive
        iff its teacher query is in ``M_l``; found through :func:`inverse_permutation`, no search.
    """
    device = teacher_idx.device
    inv = inverse_permutation(teacher_idx, num_teacher)  # teacher -> pair row
    query_idx = match[0].to(device).long()
    gt_idx = match[1].to(device).long()
    rows = inv[query_idx]
    keep = rows >= 0
    positive = torch.zeros(teacher_idx.numel(), dtype=torch.bool, device=device)
    target = torch.zeros(teacher_idx.numel(), dtype=torch.long, device=device)
    positive[rows[keep]] = True
    target[rows[keep]] = gt_labels.to(device).long()[gt_idx[keep]]
    return positive, target
