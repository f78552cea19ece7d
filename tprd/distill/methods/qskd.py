"""QSKD: query selection for DETR distillation (docs/methods.md#qskd; TPRD variant #tprd-variants).

Per decoder stage ``l`` (student stage ``l`` <-> its paired teacher stage, ``l`` for equal depths;
docs/methods.md#stage-pairing; "layer ``l``" below is then the paired teacher layer):

1. **Group query selection by GIoU** (:func:`giou_query_selection`, each model separately): B1
   matching of the stage-``l`` outputs to the GT gives the positives; the *hard negatives* are the
   unmatched queries whose largest GIoU with any GT of the image is ``> giou_threshold`` (0,
   strict). Images without GT have neither. The teacher's *selected set* is its positives (score
   ``g`` = GIoU with the matched GT) and its hard negatives (``g`` = the largest GIoU).
2. **Pairing** (:func:`pair_selected_queries`): positive pairs = the student and teacher positives
   matched to the same GT; hard-negative pairs = the soft Hungarian matching B3 between the student
   and the teacher hard negatives of the image (``min(n_s, n_t)`` pairs).
3. **Prediction distillation** (``class``, ``l1``, ``giou``): B4 soft-BCE (summed over classes),
   L1 (summed over the 4 coordinates) and ``1 − GIoU`` over all pairs of the batch, each **averaged
   over the number of pairs** of the stage. A stage without pairs gives a zero that keeps the graph
   (docs/methods.md#diff-9). Under DDP the number of pairs is that of the whole batch, summed over the processes
   and divided by their number (as DETR's ``num_boxes``, see :func:`global_pair_count`), so the
   term is the one-process value on any number of processes (a per-process count would weight the
   pairs of a process with few pairs more).
4. **Attention-guided memory distillation** (``feature``): per image the mask
   ``M = mean_{i ∈ selected} (1 + g_i)·A_i`` over the teacher's per-query cross-attention maps
   ``A_i`` (length ``S``, B6 summed over heads, levels and points; DAB-DETR: its dense attention
   summed over heads), ``M = 0`` without a selected query, ``M ← M / max(max_x M, 0.01)``, and the
   term ``mean_{B,S,D} (M·memory_t − M·memory_s)²``. Because splatting is linear in the attention
   weights, ``Σ_i w_i A_i`` is computed as one splat of the weights scaled by ``w_i``
   (:func:`weighted_query_attention`): no ``[B,Q,S]`` map is formed.

   Stage ``l``'s selection weights the maps of decoder layer ``l`` (clean, docs/methods.md#diff-8).
   ``reference_stage_order=True`` restores the reference's zip of the selection list
   ``[final, stage 1, …, stage L−1]`` with the maps ``[layer 1, …, layer L]``: layer 1 gets the
   final stage's selection and layer ``k+1`` stage ``k``'s; the term of layer ``L`` is the one
   logged without suffix.

Selection and pairing are computed on the **raw** outputs of both models. ``refine=True``
(QSKD_TPRD, docs/methods.md#tprd-variants): the targets at the paired teacher queries are the TPRD-refined stage-``l``
predictions (B1 matching ``M_l`` of the raw teacher, shared with the selection), the class term is
TPRD-CKD averaged over the pairs with positives = the positive pairs (their teacher queries are
exactly ``M_l``, docs/methods.md#tprd-alignment), the boxes go towards the refined boxes; the memory term stays raw.

Only the per-image Hungarian assignments loop in Python (scipy); selection, positive pairing,
losses and masks are batched over stages, images and queries.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from tprd.distill.attention import group_slice
from tprd.distill.losses import box_pair_losses, soft_bce_pair_losses
from tprd.distill.soft_matcher import soft_match_cost
from tprd.distill.splat import splat_deformable_attention
from tprd.distill.tprd import build_match_index, pad_ground_truth, tprd_class_kd
from tprd.layers.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from tprd.modeling.outputs import StagePredictions

from .base import DistillContext, DistillMethod, TPRDOptions
from .common import check_same_stages, check_same_width, paired_matches, paired_stages, tprd_refine_and_targets, tprd_stats

__all__ = [
    "QSKD",
    "giou_query_selection",
    "pair_selected_queries",
    "weighted_query_attention",
    "selection_stage_of_layer",
]

Match = Tuple[Tensor, Tensor]


# ----------------------------------------------------------------------------------------------
# 1. selection
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def giou_query_selection(
    boxes: Tensor, matches: Sequence[Sequence[Match]], targets: Sequence[Mapping[str, Tensor]], threshold: float = 0.0
) -> Dict[str, Tensor]:
    """GIoU-based group query selection of one model at every stage.

    Args:
        boxes: ``[L,B,N,4]`` predicted cxcywh boxes.
        matches: B1 matches ``matches[l][b] = (query_idx, gt_idx)`` of these predictions.
        targets: per image ``{"labels" [G], "boxes" [G,4]}``.
        threshold: hard negatives need a largest GIoU with a GT strictly above it.

    Returns:
        ``match_index [L,B,N]`` (matched GT or −1), ``positive``, ``hard_negative`` (bool
        ``[L,B,N]``) and ``score [L,B,N]`` (GIoU with the matched GT for positives, the largest GIoU
        for hard negatives, 0 elsewhere).
    """
    num_stages, batch, nq, _ = boxes.shape
    labels = [t["labels"] for t in targets]
    gt_boxes = [t["boxes"] for t in targets]
    _, gt, num_gt = pad_ground_truth(labels, gt_boxes, device=boxes.device, dtype=boxes.dtype)
    match_index = build_match_index(matches, nq, device=boxes.device)
    valid = torch.arange(gt.shape[1], device=boxes.device)[None] < num_gt[:, None]  # [B,G]
    giou = generalized_box_iou(
        box_cxcywh_to_xyxy(boxes.float()), box_cxcywh_to_xyxy(gt.float())[None].expand(num_stages, -1, -1, -1)
    )  # [L,B,N,G]
    best = giou.masked_fill(~valid[None, :, None], float("-inf")).amax(-1)  # [L,B,N]
    positive = match_index >= 0
    matched_giou = giou.gather(-1, match_index.clamp(min=0)[..., None]).squeeze(-1)
    hard_negative = ~positive & (best > threshold) & (num_gt > 0)[None, :, None]
    score = torch.where(positive, matched_giou, torch.where(hard_negative, best, torch.zeros_like(best)))
    return {"match_index": match_index, "positive": positive, "hard_negative": hard_negative, "score": score}


# ----------------------------------------------------------------------------------------------
# 2. pairing
# ----------------------------------------------------------------------------------------------
def _gt_to_query(match_index: Tensor, num_gt_slots: int) -> Tensor:
    """``[L,B,G]``: the query matched to each GT slot (−1 if none), from ``match_index [L,B,N]``."""
    num_stages, batch, _ = match_index.shape
    out = match_index.new_full((num_stages, batch, num_gt_slots), -1)
    l, b, q = (match_index >= 0).nonzero(as_tuple=True)
    out[l, b, match_index[l, b, q]] = q
    return out


@torch.no_grad()
def pair_selected_queries(
    student: StagePredictions,
    teacher: StagePredictions,
    s_sel: Mapping[str, Tensor],
    t_sel: Mapping[str, Tensor],
    soft_costs: Sequence[float] = (1.0, 5.0, 2.0),
) -> Dict[str, Tensor]:
    """Pairs of every stage: positives by shared GT, hard negatives by soft Hungarian matching.

    Args:
        student, teacher: raw per-stage predictions ``[L,B,N,·]``.
        s_sel, t_sel: :func:`giou_query_selection` of the student and of the teacher.
        soft_costs: ``(class, L1, GIoU)`` costs of the soft matcher B3.

    Returns:
        flat pair list ``{"stage", "image", "student", "teacher"}`` (long ``[P]``) and
        ``"positive"`` (bool ``[P]``): for each stage and image its positive pairs, then its
        hard-negative pairs.
    """
    device = student.logits.device
    num_gt_slots = int(max(int(s_sel["match_index"].max()), int(t_sel["match_index"].max()), 0)) + 1
    s_gt, t_gt = _gt_to_query(s_sel["match_index"], num_gt_slots), _gt_to_query(t_sel["match_index"], num_gt_slots)
    pl, pb, pj = ((s_gt >= 0) & (t_gt >= 0)).nonzero(as_tuple=True)
    pos = (pl, pb, s_gt[pl, pb, pj], t_gt[pl, pb, pj])

    s_hard, t_hard = s_sel["hard_negative"], t_sel["hard_negative"]
    both = (s_hard.any(-1) & t_hard.any(-1)).nonzero().tolist()  # [(l, b)] with negatives on both sides
    neg: List[List[int]] = [[], [], [], []]
    if both:
        cost = soft_match_cost(student.logits, student.boxes, teacher.logits, teacher.boxes, *soft_costs)
        ls = torch.tensor([lb[0] for lb in both], device=device)
        bs = torch.tensor([lb[1] for lb in both], device=device)
        cost, s_mask, t_mask = cost[ls, bs].cpu().numpy(), s_hard[ls, bs].cpu().numpy(), t_hard[ls, bs].cpu().numpy()
        for (l, b), c, sm, tm in zip(both, cost, s_mask, t_mask):  # Hungarian: one call per (stage, image)
            rows, cols = np.flatnonzero(sm), np.flatnonzero(tm)
            r, k = linear_sum_assignment(c[np.ix_(rows, cols)])
            neg[0] += [l] * len(r)
            neg[1] += [b] * len(r)
            neg[2] += rows[r].tolist()
            neg[3] += cols[k].tolist()
    neg_t = [torch.tensor(v, dtype=torch.long, device=device) for v in neg]
    stage, image, s_idx, t_idx = (torch.cat([p, n]) for p, n in zip(pos, neg_t))
    positive = torch.cat([torch.ones_like(pos[0], dtype=torch.bool), torch.zeros_like(neg_t[0], dtype=torch.bool)])
    # per stage and image: positives first, then hard negatives
    order = torch.argsort((stage * student.logits.shape[1] + image) * 2 + (~positive).long(), stable=True)
    return {"stage": stage[order], "image": image[order], "student": s_idx[order], "teacher": t_idx[order],
            "positive": positive[order]}


# ----------------------------------------------------------------------------------------------
# 4. attention-guided memory mask
# ----------------------------------------------------------------------------------------------
def weighted_query_attention(tap: Mapping[str, Any], weights: Tensor, queries: slice = slice(None)) -> Tensor:
    """``Σ_q w_q A_q`` ``[B,S]`` for one decoder layer's cross-attention tap, with ``A_q`` the per-query
    map (B6 ``reduce="query"``: summed over heads, levels, points; dense: summed over heads) of the
    queries ``queries`` and ``weights [B,Q]``.

    Splatting is linear in the attention weights, so this is one head-reduced splat of the weights
    scaled per query, summed over heads -- equal to the weighted sum of the ``[B,Q,S]`` maps
    without forming them.
    """
    kind = tap.get("kind")
    if kind == "deformable":
        aw = tap["attention_weights"][:, queries]
        scaled = aw * weights.to(aw.dtype)[:, :, None, None, None]
        per_head = splat_deformable_attention(
            tap["sampling_locations"][:, queries], scaled, tap["spatial_shapes"], tap["level_start_index"], "head"
        )
        return per_head.sum(1)
    if kind == "dense":
        aw = tap["attention_weights"][:, :, queries]  # [B,M,Q,S]
        return torch.einsum("bmqs,bq->bs", aw, weights.to(aw.dtype))
    raise ValueError(f"unknown cross-attention tap kind {kind!r} (expected 'deformable' or 'dense')")


def selection_stage_of_layer(num_stages: int, reference_stage_order: bool = False) -> Tensor:
    """Which stage's selection weights the maps of each decoder layer, ``[L]`` (0-based): layer ``l``
    <- stage ``l`` (clean), or the reference's zip: layer 0 <- the final stage, layer ``k`` <- stage
    ``k−1``."""
    layers = torch.arange(num_stages)
    return (layers - 1) % num_stages if reference_stage_order else layers


# ----------------------------------------------------------------------------------------------
# the method
# ----------------------------------------------------------------------------------------------
def global_pair_count(count: Tensor) -> Tensor:
    """Per-stage pair counts ``[L]`` of this process -> the normaliser of the pair means: the counts
    summed over the processes and divided by their number, at least ``1 / world size`` (a stage
    without pairs anywhere then gives 0). With one process: ``count.clamp(min=1)``.

    Each process divides its pair sum by this and DDP averages the gradients over the processes,
    so the gradient is that of the sum over all pairs divided by the total count: the one-process
    mean over the whole batch."""
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if world == 1:
        return count.clamp(min=1)
    total = count.detach().clone()
    dist.all_reduce(total)
    return total.clamp(min=1) / world


class QSKD(DistillMethod):
    """QSKD with optional TPRD.

    Args:
        weights: ``class``, ``l1``, ``giou`` (pair KD), ``feature`` (attention-guided memory).
            Default 1 / 5 / 2 / 100.
        **tprd: the TPRD options, kept as ``self.tprd`` (:class:`~.base.TPRDOptions`):
        refine: TPRD on the pair-KD targets (QSKD_TPRD).
        matcher: B1 matcher of the selection (both models) and of TPRD (focal Hungarian 2 / 5 / 2).
        soft_costs: ``(class, L1, GIoU)`` costs of the hard-negative soft matching (1, 5, 2).
        giou_threshold: hard negatives need a largest GIoU with a GT strictly above it (0).
        reference_stage_order: the reference's stage/layer misalignment of the memory term (docs/methods.md#diff-8).
        skip_empty_images, alpha, beta: TPRD parity flag and TPRD-CKD weights.
    """

    name = "qskd"
    terms = ("class", "l1", "giou", "feature")
    needs = ("predictions", "memory", "attention")

    def __init__(
        self,
        weights: Optional[Dict[str, float]] = None,
        giou_threshold: float = 0.0,
        reference_stage_order: bool = False,
        name: Optional[str] = None,
        **tprd: Any,
    ):
        if weights is None:
            weights = {"class": 1.0, "l1": 5.0, "giou": 2.0, "feature": 100.0}
        super().__init__(weights, name)
        self.tprd = TPRDOptions(**tprd)
        self.giou_threshold = float(giou_threshold)
        self.reference_stage_order = bool(reference_stage_order)

    def check_models(self, student: nn.Module, teacher: nn.Module) -> None:
        check_same_width(student, teacher,
                         "QSKD compares the encoder memories; their widths differ (teacher {dt}, student {ds})")
        check_same_stages(student, teacher, "QSKD")

    # ------------------------------------------------------------------ terms
    def _pair_kd(self, ctx: DistillContext, pairs: Mapping[str, Tensor], t_match_index: Tensor) -> Dict[str, Tensor]:
        s, t = ctx.student_out.main, ctx.teacher_out.main
        num_stages, _, _, nc = s.logits.shape
        if self.tprd.refine:
            t_logits, t_boxes, _, labels_pad, stats = tprd_refine_and_targets(
                ctx, t, self.tprd, key="main", stages=ctx.teacher_stages
            )
            self.last_stats = tprd_stats(f"tprd_{self.name}", stats)
        else:
            t = paired_stages(t, ctx.teacher_stages)
            t_logits, t_boxes = t.logits.detach(), t.boxes.detach()
        l, b, qs, qt = pairs["stage"], pairs["image"], pairs["student"], pairs["teacher"]
        s_lg, s_bx = s.logits[l, b, qs], s.boxes[l, b, qs]  # [P,C], [P,4]
        t_lg, t_bx = t_logits[l, b, qt], t_boxes[l, b, qt]
        if self.tprd.refine:
            gt = t_match_index[l, b, qt]  # the positive pairs are exactly the teacher queries in M_l
            positive = gt >= 0
            cls = torch.where(positive, labels_pad[b, gt.clamp(min=0)], torch.zeros_like(gt))
            class_pp = tprd_class_kd(s_lg, t_lg, positive, cls, alpha=self.tprd.alpha, beta=self.tprd.beta,
                                     form=self.tprd.class_kd)
            l1, giou = box_pair_losses(s_bx, t_bx)
        else:
            per = soft_bce_pair_losses(s_lg, t_lg, s_bx, t_bx, reduction="none")
            class_pp, l1, giou = per["class"], per["l1"], per["giou"]
        count = global_pair_count(torch.bincount(l, minlength=num_stages).to(s.logits.dtype))
        keep = 0.0 * (s.logits.sum() + s.boxes.sum())  # a stage without pairs: a zero with the graph

        def mean(per_pair: Tensor) -> Tensor:
            total = per_pair.new_zeros(num_stages).index_add(0, l, per_pair)
            return total / count + keep

        return {"class": mean(class_pp), "l1": mean(l1), "giou": mean(giou)}

    @torch.no_grad()
    def memory_masks(self, ctx: DistillContext, t_sel: Mapping[str, Tensor]) -> Tensor:
        """``[L,B,S]``: the normalised attention-guided masks of the decoder layers."""
        taps = ctx.teacher_out.taps.get("decoder_cross_attn")
        if taps is None:
            raise KeyError("QSKD needs the teacher's decoder cross-attention taps (needs 'attention')")
        selected = t_sel["positive"] | t_sel["hard_negative"]  # [L,B,Nt]
        weight = torch.where(selected, 1.0 + t_sel["score"], torch.zeros_like(t_sel["score"]))
        weight = weight / selected.sum(-1, keepdim=True).clamp(min=1)  # mean over the selected queries
        layers = ctx.teacher_stages or list(range(len(taps)))  # the teacher layer of each (student) stage
        stage_of = selection_stage_of_layer(len(layers), self.reference_stage_order)
        queries = group_slice(ctx.teacher_out, "main")
        masks = torch.stack([weighted_query_attention(taps[layers[k]], weight[int(stage_of[k])], queries)
                             for k in range(len(layers))])
        return masks / masks.amax(-1, keepdim=True).clamp(min=0.01)

    def _feature(self, ctx: DistillContext, t_sel: Mapping[str, Tensor]) -> Tensor:
        mem_t, mem_s = ctx.teacher_out.taps.get("memory"), ctx.student_out.taps.get("memory")
        if mem_t is None or mem_s is None:
            raise KeyError("QSKD needs both models' encoder memory (taps['memory'])")
        if mem_t.shape != mem_s.shape:
            raise ValueError(
                f"QSKD compares encoder memories token by token; teacher {tuple(mem_t.shape)} vs student "
                f"{tuple(mem_s.shape)}: use the same feature levels and strides in both models"
            )
        with ctx.section("attention_maps"):
            mask = self.memory_masks(ctx, t_sel)  # [L,B,S]
        sq = (mem_t.detach() - mem_s).pow(2).sum(-1)  # [B,S]: (M m_t − M m_s)² = M² (m_t − m_s)², over D
        return (mask.pow(2) * sq[None]).flatten(1).sum(-1) / mem_s.numel()

    def losses(self, ctx: DistillContext) -> Dict[str, Tensor]:
        s, t_all = ctx.student_out.main, ctx.teacher_out.main
        # M_k of every teacher stage (shared with TPRD), then the stages paired with the student's
        t_matches = paired_matches(ctx.teacher_gt_matches(t_all, self.tprd.matcher, key="main"), ctx.teacher_stages)
        t = paired_stages(t_all, ctx.teacher_stages)
        with ctx.section("matching"):
            s_matches = self.tprd.matcher.match_stages(s.logits.detach(), s.boxes.detach(), ctx.targets)
            s_sel = giou_query_selection(s.boxes.detach(), s_matches, ctx.targets, self.giou_threshold)
            t_sel = giou_query_selection(t.boxes.detach(), t_matches, ctx.targets, self.giou_threshold)
            pairs = pair_selected_queries(
                StagePredictions(s.logits.detach(), s.boxes.detach()), StagePredictions(t.logits.detach(), t.boxes.detach()),
                s_sel, t_sel, self.tprd.soft_costs,
            )
        out = self._pair_kd(ctx, pairs, t_sel["match_index"])
        out["feature"] = self._feature(ctx, t_sel)
        return out

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, refine={self.tprd.refine}, giou_threshold={self.giou_threshold}, "
            f"reference_stage_order={self.reference_stage_order}, weights={self.weights}"
        )
