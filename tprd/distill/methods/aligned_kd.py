"""Prediction distillation of aligned student/teacher query pairs (B3 + B4, and the TPRD variant of
docs/methods.md#tprd-ckd, #tprd-alignment), shared by DETRDistill, D³ETR, CrossKD and the stand-alone ``tprd_kd`` method.

* :func:`soft_matched_indices`: the soft Hungarian matcher B3 at every stage -> pair indices.
* :func:`aligned_prediction_kd`: B4 soft-BCE / L1 / ``1 − GIoU`` over given pairs, or TPRD-CKD with
  positives mapped through the alignment; ``Σ_pairs / norm``.
* :func:`matching_kd`: the two together against the raw or TPRD-refined teacher (``A = B·Ns``).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

from tprd.distill.losses import box_pair_losses, soft_bce_pair_losses
from tprd.distill.soft_matcher import soft_hungarian_match_stages
from tprd.distill.tprd import aligned_positive_targets, tprd_class_kd
from tprd.modeling.outputs import StagePredictions

from .base import DistillContext, TPRDOptions
from .common import paired_stages, tprd_refine_and_targets

__all__ = ["soft_matched_indices", "aligned_prediction_kd", "matching_kd"]


def soft_matched_indices(ctx: DistillContext, s: StagePredictions, t_logits: Tensor, t_boxes: Tensor,
                         soft_costs: Sequence[float]) -> Tuple[Tensor, Tensor]:
    """Soft matcher B3 at every stage between the student group ``s`` (``[L,B,Ns,·]``) and teacher
    targets ``[L,B,Nt,·]``: student and teacher query of each pair, ``s_idx``, ``t_idx`` ``[L,B,P]``
    (``P = min(Ns, Nt)``; a full permutation in increasing student order when equal)."""
    with ctx.section("matching"):
        pairs = soft_hungarian_match_stages(s.logits, s.boxes, t_logits, t_boxes, *soft_costs)
        s_idx = torch.stack([torch.stack([p[0] for p in stage]) for stage in pairs])  # [L,B,P]
        t_idx = torch.stack([torch.stack([p[1] for p in stage]) for stage in pairs])
    return s_idx.to(s.logits.device), t_idx.to(s.logits.device)


def aligned_prediction_kd(
    s: StagePredictions,
    t_logits: Tensor,
    t_boxes: Tensor,
    s_idx: Tensor,
    t_idx: Tensor,
    norm: float,
    tprd: Optional[Tuple[Tensor, Tensor]] = None,
    alpha: float = 1.0,
    beta: float = 1.0,
    class_kd: str = "decoupled",
) -> Dict[str, Tensor]:
    """Prediction distillation of aligned pairs at every stage, ``{"class", "l1", "giou"}`` ``[L]``,
    each ``Σ_pairs / norm``.

    Pairs: student query ``s_idx[l,b,i]`` <-> teacher query ``t_idx[l,b,i]`` (``[L,B,P]``; the soft
    matcher's pairs or the identity). Baseline (``tprd=None``): B4 soft-BCE / L1 / ``1 − GIoU``.
    ``tprd = (match_index [L,B,Nt], labels_pad [B,G])`` (from :func:`tprd_refine_and_targets`,
    with ``t_logits``/``t_boxes`` the refined targets): the class term is TPRD-CKD, a pair being
    positive iff its teacher query is in ``M_l`` (docs/methods.md#tprd-ckd, #tprd-alignment).
    """
    num_stages, batch, _, nc = s.logits.shape
    s_lg = s.logits.gather(2, s_idx[..., None].expand(-1, -1, -1, nc))
    s_bx = s.boxes.gather(2, s_idx[..., None].expand(-1, -1, -1, 4))
    t_lg = t_logits.detach().gather(2, t_idx[..., None].expand(-1, -1, -1, nc))
    t_bx = t_boxes.detach().gather(2, t_idx[..., None].expand(-1, -1, -1, 4))
    if tprd is not None:
        match_index, labels_pad = tprd
        positive, cls = aligned_positive_targets(
            match_index.flatten(0, 1), labels_pad.repeat(num_stages, 1), t_idx.flatten(0, 1)
        )
        class_pp = tprd_class_kd(
            s_lg.reshape(-1, nc), t_lg.reshape(-1, nc), positive.reshape(-1), cls.reshape(-1), alpha=alpha, beta=beta,
            form=class_kd,
        ).view(s_idx.shape)
        l1, giou = box_pair_losses(s_bx, t_bx)
    else:
        per = soft_bce_pair_losses(s_lg.reshape(-1, nc), t_lg.reshape(-1, nc), s_bx.reshape(-1, 4),
                                   t_bx.reshape(-1, 4), reduction="none")
        class_pp, l1, giou = (per[k].view(s_idx.shape) for k in ("class", "l1", "giou"))
    return {
        "class": class_pp.flatten(1).sum(-1) / norm,
        "l1": l1.flatten(1).sum(-1) / norm,
        "giou": giou.flatten(1).sum(-1) / norm,
    }


def matching_kd(
    ctx: DistillContext,
    student: StagePredictions,
    teacher: StagePredictions,
    options: TPRDOptions,
    key: str = "main",
    stages: Optional[Sequence[int]] = None,
) -> Tuple[Dict[str, Tensor], Optional[Dict[str, Tensor]]]:
    """Soft-Hungarian matched prediction KD at every stage (student stage ``l`` <-> teacher stage
    ``stages[l]``, or ``l`` when ``stages`` is ``None``; docs/methods.md#stage-pairing).

    ``options.refine=False``: B3 (costs ``options.soft_costs``) against the raw teacher, B4
    soft-BCE / L1 / ``1 − GIoU``. ``options.refine=True``: the teacher's stage-``l`` predictions are
    TPRD-refined (B1 matching ``M_l`` of the raw teacher with ``options.matcher``, cached in ``ctx`` under ``key`` and shared with any other
    method asking for it), B3 runs against the refined targets, the class term is TPRD-CKD (a pair
    is positive iff its teacher query is in ``M_l``) and the boxes go towards the refined boxes.
    Every term is ``Σ_pairs / (B·Ns)``; gradients reach ``student`` only. ``teacher`` is the whole
    teacher stack: the refinement borrows from every earlier teacher stage, paired or not.

    Returns ``({"class", "l1", "giou"}`` each ``[L]``, the raw refinement statistics or ``None``).
    """
    stats = None
    tprd = None
    if options.refine:
        t_logits, t_boxes, match_index, labels_pad, stats = tprd_refine_and_targets(ctx, teacher, options, key=key,
                                                                                   stages=stages)
        tprd = (match_index, labels_pad)
    else:
        teacher = paired_stages(teacher, stages)
        t_logits, t_boxes = teacher.logits.detach(), teacher.boxes.detach()
    s_idx, t_idx = soft_matched_indices(ctx, student, t_logits, t_boxes, options.soft_costs)
    norm = float(student.logits.shape[1] * student.logits.shape[2])  # A = B·Ns
    terms = aligned_prediction_kd(student, t_logits, t_boxes, s_idx, t_idx, norm, tprd, options.alpha, options.beta,
                                  options.class_kd)
    return terms, stats
