"""TPRD as a method of its own (``tprd_kd``): matched prediction distillation towards the
TPRD-refined teacher (METHODS.md 2.3-2.5, B3, B4).

At every decoder stage ``l`` (student stage ``l`` <-> teacher stage ``l``):

1. ``refine=True`` (default): the teacher's stage-``l`` predictions are refined with TPRD
   (:func:`~tprd.distill.tprd.refine_teacher_predictions`, B1 matching ``M_l`` of the raw stage);
   ``refine=False``: the raw teacher stage-``l`` predictions are the targets.
2. The soft matcher B3 pairs the student's main-group queries with the (refined) teacher queries: a
   full permutation ``π`` for equal query counts, ``min(Ns, Nt)`` pairs otherwise.
3. ``class``: TPRD-CKD (spec 2.4) with positives mapped through the alignment (pair ``n`` is positive
   iff ``π(n) ∈ M_l``, with the class of the GT matched to ``π(n)``, spec 2.5); with
   ``refine=False`` the soft-BCE class term of B4. ``l1``, ``giou``: ``Σ_4 |b_s − b_t|`` and
   ``1 − GIoU`` towards the (refined) teacher boxes.
4. Every term is summed over the pairs and divided by ``B·Ns``.

This is exactly DETRDistill_TPRD's matching-KD part, so both use :func:`matching_kd` (one copy).
As a method it composes with any other (``FGD_TPRD`` = ``fgd`` + ``tprd_kd``) or runs alone
(the ``TPRD`` configs, the pure-TPRD ablation); ``refine=False`` measures what the refinement
itself adds. Neither composition exists in the reference (spec 2.6: no TPRD variant of FGD,
FitNet, MGD).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from tprd.distill.losses import box_pair_losses, soft_bce_pair_losses
from tprd.distill.soft_matcher import soft_hungarian_match_stages
from tprd.distill.tprd import aligned_positive_targets, decoupled_kd

from .base import DistillContext, DistillMethod
from .kd_detr import check_same_stages, tprd_refine_and_targets, tprd_stats

__all__ = ["TPRDKD", "matching_kd"]


def matching_kd(
    ctx: DistillContext,
    matcher: nn.Module,
    refine: bool,
    soft_costs: Sequence[float] = (1.0, 5.0, 2.0),
    skip_empty_images: bool = False,
    alpha: float = 1.0,
    beta: float = 1.0,
) -> Tuple[Dict[str, Tensor], Optional[Dict[str, Tensor]]]:
    """Soft-Hungarian matched prediction KD of the main groups at every stage (see module doc).

    Args:
        ctx: the iteration's context (``student_out.main`` / ``teacher_out.main`` ``[L,B,N,·]``, GT).
        matcher: B1 teacher–GT matcher (TPRD's ``M_l``; shared through ``ctx`` with any other method
            that asks for the same matching).
        refine: TPRD targets + TPRD-CKD (``True``) or raw targets + soft-BCE (``False``).
        soft_costs: ``(class, L1, GIoU)`` costs of B3.
        skip_empty_images, alpha, beta: TPRD parity flag (spec 8 #5) and TPRD-CKD weights.

    Returns:
        ``{"class", "l1", "giou"}`` each ``[L]`` (``Σ_pairs / (B·Ns)``) and the raw refinement
        statistics of :func:`~tprd.distill.tprd.refine_teacher_predictions` (``None`` without TPRD).
    """
    s, t = ctx.student_out.main, ctx.teacher_out.main
    num_stages, batch, ns, nc = s.logits.shape
    stats = None
    if refine:
        t_logits, t_boxes, match_index, labels_pad, stats = tprd_refine_and_targets(
            ctx, t, matcher, skip_empty_images, key="main"
        )
    else:
        t_logits, t_boxes = t.logits.detach(), t.boxes.detach()
    with ctx.section("matching"):
        pairs = soft_hungarian_match_stages(s.logits, s.boxes, t_logits, t_boxes, *soft_costs)
        s_idx = torch.stack([torch.stack([p[0] for p in stage]) for stage in pairs])  # [L,B,P]
        t_idx = torch.stack([torch.stack([p[1] for p in stage]) for stage in pairs])
    s_lg = s.logits.gather(2, s_idx[..., None].expand(-1, -1, -1, nc))
    s_bx = s.boxes.gather(2, s_idx[..., None].expand(-1, -1, -1, 4))
    t_lg = t_logits.gather(2, t_idx[..., None].expand(-1, -1, -1, nc))
    t_bx = t_boxes.gather(2, t_idx[..., None].expand(-1, -1, -1, 4))
    norm = float(batch * ns)
    if refine:
        positive, cls = aligned_positive_targets(
            match_index.flatten(0, 1), labels_pad.repeat(num_stages, 1), t_idx.flatten(0, 1)
        )
        class_pp = decoupled_kd(
            s_lg.reshape(-1, nc), t_lg.reshape(-1, nc), positive.reshape(-1), cls.reshape(-1),
            alpha=alpha, beta=beta,
        ).view(s_idx.shape)
        l1, giou = box_pair_losses(s_bx, t_bx)
    else:
        per = soft_bce_pair_losses(s_lg.reshape(-1, nc), t_lg.reshape(-1, nc), s_bx.reshape(-1, 4),
                                   t_bx.reshape(-1, 4), reduction="none")
        class_pp, l1, giou = (per[k].view(s_idx.shape) for k in ("class", "l1", "giou"))
    terms = {
        "class": class_pp.flatten(1).sum(-1) / norm,
        "l1": l1.flatten(1).sum(-1) / norm,
        "giou": giou.flatten(1).sum(-1) / norm,
    }
    return terms, stats


class TPRDKD(DistillMethod):
    """TPRD prediction distillation as a stand-alone method (method name ``tprd_kd``).

    Args:
        weights: ``class``, ``l1``, ``giou`` (default 3.0 / 5.0 / 2.0, the TPRD class weight of
            D³ETR/QSKD_TPRD with the usual box weights).
        refine: TPRD-refined targets + TPRD-CKD (default) or raw targets + soft-BCE (B4).
        matcher: B1 teacher–GT matcher (default focal Hungarian 2 / 5 / 2).
        soft_costs: ``(class, L1, GIoU)`` costs of the soft matcher B3 (1, 5, 2).
        skip_empty_images: TPRD parity flag (spec 8 #5).
        alpha, beta: TPRD-CKD weights of TCKD / NCKD (1, 1).

    Per-stage refinement shares go to :attr:`last_stats` as
    ``tprd_<name>_{positive,negative}_refined_frac[_l]``. Any student/teacher query counts work;
    both models need the same number of decoder stages.
    """

    name = "tprd_kd"
    terms = ("class", "l1", "giou")
    needs = ("predictions",)

    def __init__(
        self,
        weights: Optional[Dict[str, float]] = None,
        refine: bool = True,
        matcher: Optional[nn.Module] = None,
        soft_costs: Sequence[float] = (1.0, 5.0, 2.0),
        skip_empty_images: bool = False,
        alpha: float = 1.0,
        beta: float = 1.0,
        name: Optional[str] = None,
    ):
        if weights is None:
            weights = {"class": 3.0, "l1": 5.0, "giou": 2.0}
        super().__init__(weights, name)
        self.refine = bool(refine)
        if matcher is None:
            from tprd.modeling.matcher import HungarianMatcher

            matcher = HungarianMatcher(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0)
        self.matcher = matcher
        if len(soft_costs) != 3:
            raise ValueError(f"soft_costs must be (class, l1, giou), got {soft_costs}")
        self.soft_costs = tuple(float(c) for c in soft_costs)
        self.skip_empty_images = bool(skip_empty_images)
        self.alpha = float(alpha)
        self.beta = float(beta)

    def check_models(self, student: nn.Module, teacher: nn.Module) -> None:
        check_same_stages(student, teacher, "tprd_kd")

    def losses(self, ctx: DistillContext) -> Dict[str, Tensor]:
        terms, stats = matching_kd(ctx, self.matcher, self.refine, self.soft_costs, self.skip_empty_images,
                                   self.alpha, self.beta)
        if stats is not None:
            self.last_stats = tprd_stats(f"tprd_{self.name}", stats)
        return terms

    def extra_repr(self) -> str:
        return f"name={self.name!r}, refine={self.refine}, weights={self.weights}"
