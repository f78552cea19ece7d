"""CrossKD: the student's encoder memory decoded by the teacher (docs/methods.md#crosskd; TPRD variant ours).

What crosses: the student's encoder state -- memory ``[B,S,D]`` with its padding mask ``[B,S]``,
spatial shapes, level start indices and valid ratios (DAB-DETR: its single-level memory, memory
position embedding and mask) -- goes through the **teacher's post-encoder path**
(``teacher.decode_memory``): its queries, decoder and heads. Per family that path is

* Deformable DETR: the learned query table and the teacher's reference-point layer;
* DINO: the teacher's two-stage query selection run **on the crossed memory** (its encoder-output
  heads pick the top-``Q`` tokens of the student memory; references detached, content = its
  learned ``tgt_embed``), no denoising queries;
* DAB-DETR: the teacher's anchor table and conditional decoder over the single-level memory.

The crossed pass runs **with gradients**: the teacher's parameters are frozen
(``requires_grad=False``, so they never receive or accumulate a gradient), but the gradient flows
through the frozen teacher decoder into the student's encoder, neck and backbone. The student's
decoder gets only its GT loss. The teacher's own pass (the targets) stays under ``no_grad`` in the
distiller.

Loss per stage ``l``: the soft matcher B3 pairs the crossed stage-``l`` predictions with the
teacher's own stage-``l`` predictions (although both come from the same teacher queries, as in the
reference), then B4 soft-BCE / L1 / ``1 − GIoU`` summed over pairs and divided by ``A = B·Q``
(:func:`~tprd.distill.methods.aligned_kd.matching_kd`). Weights class 1.0, L1 5.0, GIoU 2.0.

``refine=True`` (CrossKD_TPRD, **ours: the reference has no TPRD variant of CrossKD**): the targets
are the TPRD-refined teacher stage-``l`` predictions (B1 matching ``M_l`` of the raw teacher stage
``l``); the soft matcher pairs the crossed predictions with the refined ones; the class term is
TPRD-CKD with positives mapped through the alignment (a pair is positive iff its teacher query is in
``M_l``, docs/methods.md#tprd-alignment) and normalised ``Σ/(B·Q)`` as DETRDistill_TPRD; the boxes go towards the refined
boxes. Weights class **3.0**, L1 5.0, GIoU 2.0 -- the class weight D³ETR_TPRD and QSKD_TPRD use
for the same soft-BCE -> TPRD-CKD switch with an unchanged ``Σ/(B·N)`` / pair normaliser (DETRDistill
uses 4.0); chosen, not tuned.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import Tensor

from tprd.modeling.detector import DETRDetector
from tprd.modeling.outputs import DetectorOutputs

from .base import DistillContext, DistillMethod, TPRDOptions
from .aligned_kd import matching_kd
from .common import check_same_width, tprd_stats

__all__ = ["CrossKD", "ENCODER_STATE_KEYS", "crossed_teacher_outputs"]

#: Entries of a detector's taps that make up its encoder state (what ``decode_memory`` reads).
ENCODER_STATE_KEYS = ("memory", "memory_mask", "pos", "memory_pos", "spatial_shapes", "level_start_index", "valid_ratios")


def crossed_teacher_outputs(teacher: DETRDetector, student_taps: Dict[str, object]) -> DetectorOutputs:
    """The teacher's post-encoder path on the student's encoder state, with gradients enabled
    towards the student memory (teacher parameters must be frozen by the caller)."""
    if "memory" not in student_taps:
        raise KeyError("CrossKD needs the student's encoder memory (taps['memory'])")
    enc = {k: student_taps[k] for k in ENCODER_STATE_KEYS if k in student_taps}
    with torch.enable_grad():
        return teacher.decode_memory(enc)


class CrossKD(DistillMethod):
    """CrossKD with optional TPRD.

    Args:
        weights: ``class``, ``l1``, ``giou`` (default 1 / 5 / 2).
        **tprd: the TPRD options, kept as ``self.tprd`` (:class:`~.base.TPRDOptions`):
        refine: TPRD on the targets (CrossKD_TPRD; ours).
        matcher: B1 teacher–GT matcher of TPRD (default focal Hungarian 2 / 5 / 2).
        soft_costs: ``(class, L1, GIoU)`` costs of the soft matcher B3 (1, 5, 2).
        skip_empty_images, alpha, beta: TPRD parity flag and TPRD-CKD weights.
    """

    name = "crosskd"
    terms = ("class", "l1", "giou")
    needs = ("predictions", "memory")
    #: the one method whose loss back-propagates through the (frozen) teacher
    grad_through_teacher = True

    def __init__(
        self,
        weights: Optional[Dict[str, float]] = None,
        name: Optional[str] = None,
        **tprd: Any,
    ):
        if weights is None:
            weights = {"class": 1.0, "l1": 5.0, "giou": 2.0}
        super().__init__(weights, name)
        self.tprd = TPRDOptions(**tprd)

    def check_models(self, student: DETRDetector, teacher: DETRDetector) -> None:
        if student.family != teacher.family:
            raise ValueError(
                f"CrossKD decodes the student's memory with the teacher: one detector family needed, got "
                f"{student.family} and {teacher.family}"
            )
        check_same_width(student, teacher, "CrossKD feeds the student's {ds}-d memory to the teacher's {dt}-d "
                         "decoder; use the same transformer embed_dim in both models")
        ls, lt = student.num_feature_levels, teacher.num_feature_levels
        if ls != lt:
            raise ValueError(f"CrossKD: the student's memory has {ls} feature levels but the teacher's decoder expects {lt}")

    def losses(self, ctx: DistillContext) -> Dict[str, Tensor]:
        with ctx.section("teacher_cross_forward"):
            crossed = crossed_teacher_outputs(ctx.teacher, ctx.student_out.taps).main
        # the crossed pass has the teacher's depth: crossed stage l <-> teacher stage l, whatever the student's
        terms, stats = matching_kd(ctx, crossed, ctx.teacher_out.main, self.tprd)
        if stats is not None:
            self.last_stats = tprd_stats(f"tprd_{self.name}", stats)
        return terms

    def extra_repr(self) -> str:
        return f"name={self.name!r}, refine={self.tprd.refine}, weights={self.weights}"
