"""D³ETR: MixMatcher distillation of predictions and decoder attention (docs/methods.md#d3detr; TPRD #tprd-variants).

The student decodes its own queries and, as a separate group over the same memory, the teacher's
initial queries (the *fixed* group; DINO: the teacher's content embedding + its image-dependent
reference boxes; DAB-DETR: its anchors). Both models return their decoder attention taps
(:mod:`tprd.distill.attention`): per layer the per-head self-attention softmax weights *before
dropout* (docs/methods.md#diff-19) and the cross-attention aggregated per head over the group's queries
(deformable layers splatted with B6, DAB-DETR's dense attention summed). Denoising queries enter
no term: every map is cut to its group.

Per decoder stage ``l`` (student stage/layer ``l`` <-> its paired teacher stage/layer, ``l`` for equal
depths; docs/methods.md#stage-pairing):

* **adaptive group** (``class l1 giou self_attn cross_attn``): soft matcher B3 between the
  student's main group and the teacher's main group -> pairs ``(n, π(n))``; B4 soft-BCE / L1 /
  ``1 − GIoU`` over the pairs, ``/ (B·Ns)``; ``self_attn`` = mean over ``(B, M, P, P)`` of
  ``(A^s[n, n'] − A^t[π(n), π(n')])²`` (the teacher map permuted into student order);
  ``cross_attn`` = mean over ``(B, M, S)`` of the squared difference of the head-aggregated maps.
* **fixed group** (``fixed_*``): the student's decoding of the teacher's queries against the
  teacher's main group with the identity alignment ``q <-> q``: the same five terms, ``/ (B·Nt)``.

``refine=True`` (D3DETR_TPRD): the teacher's stage-``l`` targets are the TPRD-refined predictions
(``M_l`` = B1 matching of the raw stage), the adaptive matcher runs against them, the class terms
of both groups become TPRD-CKD (positives through π for the adaptive group, directly for the fixed
one) and the boxes go towards the refined boxes; the attention terms stay on the raw maps.

Student and teacher need the same number of attention heads and memory tokens (same neck
levels/strides) and the teacher at least as many decoder layers as the student; their query counts
may differ.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from tprd.distill.attention import cross_attention_maps, self_attention_maps
from tprd.modeling.outputs import QueryGroup

from .base import DistillContext, DistillMethod, TPRDOptions, query_group_from_tap
from .aligned_kd import aligned_prediction_kd, soft_matched_indices
from .common import check_same_stages, check_same_width, paired_stages, tprd_refine_and_targets, tprd_stats

__all__ = ["D3DETR", "self_attention_kd", "cross_attention_kd"]

PRED_TERMS = ("class", "l1", "giou")
ATTN_TERMS = ("self_attn", "cross_attn")


def self_attention_kd(student_maps: Tensor, teacher_maps: Tensor, s_idx: Tensor, t_idx: Tensor) -> Tensor:
    """``[L]``: per stage the mean over ``(B, M, P, P)`` of ``(A^s[n_i, n_j] − A^t[m_i, m_j])²``.

    ``student_maps [L,B,M,Ns,Ns]``, ``teacher_maps [L,B,M,Nt,Nt]`` (self-attention of one group);
    ``s_idx``/``t_idx [L,B,P]`` the aligned student/teacher queries (rows and columns are both
    re-indexed, so the teacher map is permuted into the student's order).
    """
    if student_maps.shape[:3] != teacher_maps.shape[:3]:
        raise ValueError(
            f"D³ETR self-attention maps differ in (layers, images, heads): student {tuple(student_maps.shape[:3])} "
            f"vs teacher {tuple(teacher_maps.shape[:3])}; give both decoders the same num_layers and num_heads"
        )
    s = _square_gather(student_maps, s_idx)
    t = _square_gather(teacher_maps.detach(), t_idx)
    return (s - t).pow(2).flatten(1).mean(-1)


def _square_gather(maps: Tensor, idx: Tensor) -> Tensor:
    """``maps [L,B,M,N,N]``, ``idx [L,B,P]`` -> ``maps[l,b,m][idx[l,b]][:, idx[l,b]]`` ``[L,B,M,P,P]``."""
    num_heads, n, p = maps.shape[2], maps.shape[3], idx.shape[-1]
    rows = idx[:, :, None, :, None].expand(-1, -1, num_heads, -1, n)
    out = maps.gather(3, rows)  # [L,B,M,P,N]
    cols = idx[:, :, None, None, :].expand(-1, -1, num_heads, p, -1)
    return out.gather(4, cols)


def cross_attention_kd(student_maps: Tensor, teacher_maps: Tensor) -> Tensor:
    """``[L]``: per stage the mean over ``(B, M, S)`` of the squared difference of head-aggregated
    cross-attention maps ``[L,B,M,S]``."""
    if student_maps.shape != teacher_maps.shape:
        raise ValueError(
            f"D³ETR cross-attention maps differ: student {tuple(student_maps.shape)} vs teacher "
            f"{tuple(teacher_maps.shape)} [layers, images, heads, memory tokens]; both models need the same "
            "decoder layers, heads and neck levels/strides"
        )
    return (student_maps - teacher_maps.detach()).pow(2).flatten(1).mean(-1)


class D3DETR(DistillMethod):
    """D³ETR with optional TPRD.

    Args:
        weights: ``class l1 giou self_attn cross_attn`` and the same with ``fixed_``. Default
            (docs/methods.md#weights): 1 / 5 / 2 / 10000 / 1000 for both groups (D3DETR_TPRD: both class weights 3.0).
        **tprd: the TPRD options, kept as ``self.tprd`` (:class:`~.base.TPRDOptions`):
        refine: TPRD on the prediction terms of both groups.
        matcher: B1 teacher–GT matcher for TPRD (default focal Hungarian 2 / 5 / 2).
        soft_costs: ``(class, L1, GIoU)`` costs of the soft matcher B3 (1, 5, 2).
        skip_empty_images, alpha, beta: TPRD parity flag and TPRD-CKD weights.

    A group whose weights are all 0 is not computed (the fixed group then is not decoded at all);
    with all attention weights 0 neither model computes attention maps.
    """

    name = "d3detr"
    terms = PRED_TERMS + ATTN_TERMS + tuple(f"fixed_{t}" for t in PRED_TERMS + ATTN_TERMS)
    needs = ("predictions", "queries", "attention")
    student_needs = ("attention",)

    def __init__(
        self,
        weights: Optional[Dict[str, float]] = None,
        name: Optional[str] = None,
        **tprd: Any,
    ):
        if weights is None:
            base = {"class": 1.0, "l1": 5.0, "giou": 2.0, "self_attn": 10000.0, "cross_attn": 1000.0}
            weights = {**base, **{f"fixed_{k}": v for k, v in base.items()}}
        super().__init__(weights, name)
        self.tprd = TPRDOptions(**tprd)
        self._embed_dim: Optional[int] = None
        if not any(self.weights[p + t] != 0 for p in ("", "fixed_") for t in ATTN_TERMS):
            self.needs, self.student_needs = ("predictions", "queries"), ()  # no maps to compute

    def check_models(self, student: nn.Module, teacher: nn.Module) -> None:
        self._embed_dim = check_same_width(
            student, teacher, "D³ETR feeds the teacher's queries to the student; widths differ ({dt} vs {ds})")
        check_same_stages(student, teacher, "D³ETR")

    def _uses(self, prefix: str = "") -> bool:
        return any(self.weights[prefix + t] != 0 for t in PRED_TERMS + ATTN_TERMS)

    def student_query_groups(self, ctx: DistillContext) -> List[QueryGroup]:
        if not self._uses("fixed_"):
            return []
        tap = ctx.teacher_out.taps.get("queries")
        if tap is None:
            raise KeyError("D³ETR needs the teacher's initial queries (taps['queries'])")
        return [query_group_from_tap(tap, self.group_name("teacher_queries"), ctx.batch_size, self._embed_dim)]

    # ------------------------------------------------------------------ terms
    def _targets(self, ctx: DistillContext):
        """Teacher stage targets ``[L,B,Nt,·]`` (refined with TPRD) and the TPRD positives."""
        t = ctx.teacher_out.main
        if not self.tprd.refine:
            t = paired_stages(t, ctx.teacher_stages)
            return t.logits.detach(), t.boxes.detach(), None
        logits, boxes, match_index, labels_pad, stats = tprd_refine_and_targets(
            ctx, t, self.tprd, key="main", stages=ctx.teacher_stages
        )
        self.last_stats = tprd_stats(f"tprd_{self.name}", stats)
        return logits, boxes, (match_index, labels_pad)

    @staticmethod
    def _teacher_maps(ctx: DistillContext) -> Tuple[Tensor, Tensor]:
        """The teacher's maps of the layers paired with the student's (all layers for equal depths)."""
        with torch.no_grad(), ctx.section("attention_maps"):
            out, layers = ctx.teacher_out, ctx.teacher_stages
            return self_attention_maps(out, "main", layers), cross_attention_maps(out, "head", "main", layers)

    def _group_terms(self, ctx, prefix: str, group: str, targets, teacher_maps, aligned: bool) -> Dict[str, Tensor]:
        s_out = ctx.student_out
        s = s_out.main if group == "main" else s_out.groups[group]
        t_logits, t_boxes, tprd = targets
        num_stages, batch, ns = s.logits.shape[:3]
        if aligned:  # identity: student query q <-> teacher query q
            if ns != t_logits.shape[2]:
                raise ValueError(f"D³ETR fixed group: {ns} student rows vs {t_logits.shape[2]} teacher queries")
            s_idx = torch.arange(ns, device=s.logits.device).expand(num_stages, batch, ns)
            t_idx = s_idx
        else:
            s_idx, t_idx = soft_matched_indices(ctx, s, t_logits, t_boxes, self.tprd.soft_costs)
        out = {}
        if any(self.weights[prefix + k] != 0 for k in PRED_TERMS):
            pred = aligned_prediction_kd(s, t_logits, t_boxes, s_idx, t_idx, float(batch * ns), tprd,
                                         self.tprd.alpha, self.tprd.beta, self.tprd.class_kd)
            out.update({prefix + k: v for k, v in pred.items()})
        t_self, t_cross = teacher_maps
        with ctx.section("attention_maps"):  # cutting, splatting and the two attention distances
            if self.weights[prefix + "self_attn"] != 0:
                out[prefix + "self_attn"] = self_attention_kd(self_attention_maps(s_out, group), t_self, s_idx, t_idx)
            if self.weights[prefix + "cross_attn"] != 0:
                out[prefix + "cross_attn"] = cross_attention_kd(cross_attention_maps(s_out, "head", group), t_cross)
        return out

    def losses(self, ctx: DistillContext) -> Dict[str, Tensor]:
        targets = self._targets(ctx)
        teacher_maps = self._teacher_maps(ctx) if "attention" in self.needs else (None, None)
        out: Dict[str, Tensor] = {}
        if self._uses(""):
            out.update(self._group_terms(ctx, "", "main", targets, teacher_maps, aligned=False))
        if self._uses("fixed_"):
            out.update(self._group_terms(ctx, "fixed_", self.group_name("teacher_queries"), targets, teacher_maps,
                                         aligned=True))
        return out

    def extra_repr(self) -> str:
        return f"name={self.name!r}, refine={self.tprd.refine}, weights={self.weights}"
