"""DETRDistill (docs/methods.md#detrdistill; TPRD variant #tprd-variants).

Three terms at every decoder stage ``l`` (student stage ``l`` <-> its paired teacher stage, ``l`` for
equal depths; docs/methods.md#stage-pairing):

1. **Hungarian-matching logits distillation** (``class``, ``l1``, ``giou``): the soft matcher B3
   pairs student main-group queries with teacher queries (a full permutation for equal counts,
   ``min(Ns, Nt)`` pairs otherwise); B4 soft-BCE / L1 / ``1 − GIoU`` summed over pairs and divided
   by ``A = B·Ns``.
2. **Target-aware feature distillation** (``target_aware``): from the teacher's stage-``l`` sigmoid
   scores take the top-``k`` entries of each image's ``Q·C`` table (query = entry // C), weight them
   by ``score × max IoU(query box, GT)`` (just the score for an image without GT), take those
   queries' teacher hidden states (L2-normalised) and, per neck level, the mask
   ``M(x) = max(Σ_i w_i ⟨q̂_i, F̂_t(x)⟩, 0.01)`` normalised by its per-image maximum; the term is
   ``Σ_levels mean_{B,D,H,W} (M·F_t − M·F_s)²``. Masks come from the teacher only, no padding mask.
3. **Query prior assignment** (``prior_class``, ``prior_l1``, ``prior_giou``): the student decodes the
   teacher's initial queries (a separate group) and these predictions get the standard GT losses B2
   with the teacher's own stage-``l`` GT matching ``M_l`` as the assignment (``num_boxes``
   all-reduced).

``refine=True`` (DETRDistill_TPRD): the teacher's stage-``l`` targets of term 1 are the
TPRD-refined predictions (built from the same ``M_l`` that term 3 uses, computed once), the soft
matcher runs against them, and the class term becomes TPRD-CKD (positives: pairs whose teacher
query is in ``M_l``), ``Σ/(B·Ns)``. Terms 2 and 3 stay raw.

Any student/teacher query counts work; the method needs the detector's per-stage hidden states,
neck maps (same number and sizes of levels in both models) and initial queries.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tprd.layers.box_ops import box_cxcywh_to_xyxy, paired_box_iou
from tprd.modeling.outputs import QueryGroup

from .base import DistillContext, DistillMethod, TPRDOptions, query_group_from_tap
from .aligned_kd import matching_kd
from .common import check_same_stages, check_same_width, paired_matches, paired_stages, tprd_stats

__all__ = ["DETRDistill", "target_aware_weights", "target_aware_masks", "target_aware_loss"]

PRIOR_TERMS = ("prior_class", "prior_l1", "prior_giou")


@torch.no_grad()
def target_aware_weights(
    logits: Tensor, boxes: Tensor, hidden: Tensor, targets: Sequence[Dict[str, Tensor]], topk: int = 100
) -> Tuple[Tensor, Tensor]:
    """Score-weighted query direction of every stage and image.

    Args:
        logits ``[L,B,Q,C]``, boxes ``[L,B,Q,4]`` (cxcywh), hidden ``[L,B,Q,D]``: teacher stages.
        targets: per image ``{"boxes" [G,4] cxcywh, ...}``.
        topk: entries of the flattened ``Q·C`` score table kept per image (capped at ``Q·C``).

    Returns:
        ``direction [L,B,D] = Σ_i w_i · q̂_i`` (``q̂`` the L2-normalised hidden state of entry ``i``'s
        query, ``w_i = σ-score_i · max_j IoU(box_i, GT_j)``, or ``σ-score_i`` without GT) and the
        weights ``w [L,B,k]``. Since the mask is linear in the queries,
        ``Σ_i w_i ⟨q̂_i, F̂(x)⟩ = ⟨direction, F̂(x)⟩``.
    """
    num_stages, batch, nq, nc = logits.shape
    k = min(int(topk), nq * nc)
    scores, idx = logits.sigmoid().flatten(2).topk(k, dim=-1)  # [L,B,k]
    query = torch.div(idx, nc, rounding_mode="floor")
    sel_boxes = boxes.gather(2, query[..., None].expand(-1, -1, -1, 4))
    counts = torch.tensor([int(t["boxes"].shape[0]) for t in targets], device=logits.device)
    gmax = max(int(counts.max()) if batch else 0, 1)
    gt = boxes.new_zeros(batch, gmax, 4)
    valid = torch.arange(gmax, device=logits.device)[None] < counts[:, None]  # [B,G]
    if bool(valid.any()):
        gt[valid] = torch.cat([t["boxes"].reshape(-1, 4) for t in targets]).to(gt)
    iou = paired_box_iou(box_cxcywh_to_xyxy(sel_boxes)[..., :, None, :], box_cxcywh_to_xyxy(gt)[None, :, None, :, :])
    iou = torch.where(valid[None, :, None, :], iou, torch.zeros_like(iou)).amax(-1)  # [L,B,k]
    has_gt = (counts > 0)[None, :, None]
    weight = torch.where(has_gt, scores * iou, scores)
    q = F.normalize(hidden.gather(2, query[..., None].expand(-1, -1, -1, hidden.shape[-1])), dim=-1)
    return (weight[..., None] * q).sum(2), weight


@torch.no_grad()
def target_aware_masks(direction: Tensor, teacher_feature: Tensor, floor: float = 0.01) -> Tensor:
    """Mask ``[L,B,H,W]`` of one neck level: ``max(⟨direction, F̂_t(x)⟩, floor)`` divided by its
    maximum over ``(H, W)`` per stage and image. ``direction [L,B,D]``, ``teacher_feature [B,D,H,W]``."""
    feat = F.normalize(teacher_feature, dim=1)
    mask = torch.einsum("lbd,bdhw->lbhw", direction.to(feat.dtype), feat).clamp(min=floor)
    return mask / mask.flatten(2).amax(-1)[..., None, None]


def target_aware_loss(
    direction: Tensor, teacher_features: Sequence[Tensor], student_features: Sequence[Tensor], floor: float = 0.01
) -> Tensor:
    """``[L]``: per stage ``Σ_levels mean_{B,D,H,W} (M·F_t − M·F_s)²`` (gradient to the student)."""
    if len(teacher_features) != len(student_features):
        raise ValueError(
            f"target-aware distillation pairs neck levels: teacher has {len(teacher_features)}, student "
            f"{len(student_features)}"
        )
    total = None
    for ft, fs in zip(teacher_features, student_features):
        if ft.shape != fs.shape:
            raise ValueError(f"neck maps differ in shape: teacher {tuple(ft.shape)} vs student {tuple(fs.shape)}")
        mask = target_aware_masks(direction, ft, floor)  # [L,B,H,W]
        sq = (ft.detach() - fs).pow(2).sum(1)  # [B,H,W]: (M F_t − M F_s)² = M² (F_t − F_s)², summed over D
        term = (mask.pow(2) * sq[None]).flatten(1).sum(-1) / fs.numel()
        total = term if total is None else total + term
    return total


class DETRDistill(DistillMethod):
    """DETRDistill with optional TPRD.

    Args:
        weights: ``class``, ``l1``, ``giou`` (matching KD), ``target_aware``, ``prior_class``,
            ``prior_l1``, ``prior_giou``. Default: 1 / 5 / 2, 2, 1 / 5 / 2 (the baseline config).
        **tprd: the TPRD options, kept as ``self.tprd`` (:class:`~.base.TPRDOptions`):
        refine: TPRD on the matching-KD term.
        topk: top-k entries per image for the target-aware weights (``max_per_img`` = 100).
        matcher: B1 teacher–GT matcher (default focal Hungarian 2 / 5 / 2).
        soft_costs: ``(class, L1, GIoU)`` costs of the soft matcher B3 (1, 5, 2).
        skip_empty_images, alpha, beta: TPRD parity flag and TPRD-CKD weights.

    A part whose weights are all 0 is not computed (ablations): e.g. ``prior_* = 0`` also drops
    the student's extra decoder group.
    """

    name = "detrdistill"
    terms = ("class", "l1", "giou", "target_aware", "prior_class", "prior_l1", "prior_giou")
    needs = ("predictions", "hidden", "neck", "queries")

    def __init__(
        self,
        weights: Optional[Dict[str, float]] = None,
        topk: int = 100,
        name: Optional[str] = None,
        **tprd: Any,
    ):
        if weights is None:
            weights = {"class": 1.0, "l1": 5.0, "giou": 2.0, "target_aware": 2.0,
                       "prior_class": 1.0, "prior_l1": 5.0, "prior_giou": 2.0}
        super().__init__(weights, name)
        self.tprd = TPRDOptions(**tprd)
        self.topk = int(topk)
        self._embed_dim: Optional[int] = None
        self._focal = (0.25, 2.0)

    def check_models(self, student: nn.Module, teacher: nn.Module) -> None:
        self._embed_dim = check_same_width(
            student, teacher,
            "DETRDistill feeds teacher queries to the student and compares neck maps; widths differ ({dt} vs {ds})")
        check_same_stages(student, teacher, "DETRDistill")
        self._focal = student.focal_loss_params  # RT-DETR: its matcher's 0.25 / 2, not VFL's alpha

    def _uses(self, *terms: str) -> bool:
        return any(self.weights[t] != 0 for t in terms)

    def student_query_groups(self, ctx: DistillContext) -> List[QueryGroup]:
        if not self._uses(*PRIOR_TERMS):
            return []  # ablation without prior assignment: no extra decoder group
        tap = ctx.teacher_out.taps.get("queries")
        if tap is None:
            raise KeyError("DETRDistill needs the teacher's initial queries (taps['queries'])")
        return [query_group_from_tap(tap, self.group_name("teacher_queries"), ctx.batch_size, self._embed_dim)]

    # ------------------------------------------------------------------ terms
    def _matching_kd(self, ctx: DistillContext) -> Dict[str, Tensor]:
        """Term 1 (:func:`~.aligned_kd.matching_kd`, shared with D³ETR, CrossKD and ``tprd_kd``)."""
        terms, stats = matching_kd(ctx, ctx.student_out.main, ctx.teacher_out.main, self.tprd, stages=ctx.teacher_stages)
        if stats is not None:
            self.last_stats = tprd_stats(f"tprd_{self.name}", stats)
        return terms

    def _target_aware(self, ctx: DistillContext) -> Tensor:
        t = paired_stages(ctx.teacher_out.main, ctx.teacher_stages)
        if t.hidden is None:
            raise KeyError("DETRDistill needs the teacher's per-stage hidden states (StagePredictions.hidden)")
        neck_t, neck_s = ctx.teacher_out.taps.get("neck"), ctx.student_out.taps.get("neck")
        if neck_t is None or neck_s is None:
            raise KeyError("DETRDistill needs both models' neck maps (taps['neck'])")
        direction, _ = target_aware_weights(t.logits.detach(), t.boxes.detach(), t.hidden.detach(), ctx.targets, self.topk)
        return target_aware_loss(direction, neck_t, neck_s)

    def _prior_assignment(self, ctx: DistillContext, matches) -> Dict[str, Tensor]:
        from tprd.modeling.criterion import loss_boxes, loss_labels

        p = ctx.student_out.groups[self.group_name("teacher_queries")]
        num_boxes = ctx.num_boxes()
        alpha, gamma = self._focal
        cls = loss_labels(p.logits, ctx.targets, matches, num_boxes, alpha, gamma)
        box = loss_boxes(p.boxes, ctx.targets, matches, num_boxes)
        return {"prior_class": cls, "prior_l1": box["loss_bbox"], "prior_giou": box["loss_giou"]}

    def losses(self, ctx: DistillContext) -> Dict[str, Tensor]:
        # M_l of the raw teacher stages: TPRD's positives and the prior-assignment targets, computed once.
        # Terms whose weights are all 0 are skipped (their keys are then absent).
        matches = ctx.teacher_gt_matches(ctx.teacher_out.main, self.tprd.matcher, key="main")
        out: Dict[str, Tensor] = {}
        if self._uses("class", "l1", "giou"):
            out.update(self._matching_kd(ctx))
        if self._uses("target_aware"):
            out["target_aware"] = self._target_aware(ctx)
        if self._uses(*PRIOR_TERMS):
            out.update(self._prior_assignment(ctx, paired_matches(matches, ctx.teacher_stages)))
        return out

    def extra_repr(self) -> str:
        return f"name={self.name!r}, refine={self.tprd.refine}, topk={self.topk}, weights={self.weights}"
