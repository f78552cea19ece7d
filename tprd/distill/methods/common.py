"""What the prediction-level methods share: the stage-count and width checks and the TPRD targets of a teacher
group (their TPRD options are :class:`~.base.TPRDOptions`).

* :func:`check_same_stages`: student stage ``l`` is paired with teacher stage ``l``;
* :func:`check_same_width`: the methods that feed one model's queries or memory to the other, or
  compare them, need one transformer width;
* :func:`tprd_refine_and_targets`: refined teacher predictions, the dense matched-GT index and the
  padded GT labels of one teacher group (what TPRD-CKD needs);
* :func:`tprd_stats`: the refinement shares as named per-stage statistics.

See docs/methods.md#tprd for what the refinement does.
"""
from __future__ import annotations

from typing import Dict

from torch import Tensor

from tprd.distill.tprd import build_match_index, pad_ground_truth, refine_teacher_predictions
from tprd.modeling.detector import DETRDetector
from tprd.modeling.outputs import StagePredictions

from .base import DistillContext, TPRDOptions, expand_stage_terms

__all__ = ["check_same_stages", "check_same_width", "tprd_refine_and_targets", "tprd_stats"]


def check_same_stages(student: DETRDetector, teacher: DETRDetector, method: str) -> None:
    ls, lt = student.num_stages, teacher.num_stages
    if ls != lt:
        raise ValueError(
            f"{method} pairs student stage l with teacher stage l, but the student has {ls} decoder "
            f"layers and the teacher {lt}; give both the same number of decoder layers"
        )


def check_same_width(student: DETRDetector, teacher: DETRDetector, error: str) -> int:
    """The ``embed_dim`` student and teacher share; ``ValueError(error)`` when they differ (``error``
    is formatted with the student's width ``ds`` and the teacher's ``dt``)."""
    ds, dt = student.embed_dim, teacher.embed_dim
    if ds != dt:
        raise ValueError(error.format(ds=ds, dt=dt))
    return ds


def tprd_refine_and_targets(ctx: DistillContext, teacher: StagePredictions, options: TPRDOptions, key: str):
    """TPRD on a teacher group: ``M_l`` per stage (``options.matcher``; cached in ``ctx`` under
    ``key``), refined logits and boxes ``[L,B,Qt,·]``, the dense matched-GT index ``[L,B,Qt]``
    (−1 = negative), padded GT labels ``[B,G]`` and the refinement statistics."""
    matches = ctx.teacher_gt_matches(teacher, options.matcher, key)
    with ctx.section("tprd"):
        logits, boxes, stats = refine_teacher_predictions(
            teacher.logits.detach(),
            teacher.boxes.detach(),
            matches,
            ctx.gt_labels,
            ctx.gt_boxes,
            skip_empty_images=options.skip_empty_images,
            return_stats=True,
        )
        labels_pad, _, _ = pad_ground_truth(ctx.gt_labels, ctx.gt_boxes, device=logits.device, dtype=boxes.dtype)
        match_index = build_match_index(matches, teacher.logits.shape[2], device=logits.device)
    return logits, boxes, match_index, labels_pad, stats


def tprd_stats(prefix: str, stats: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Per-stage refinement shares as ``tprd_<...>_{positive,negative}_refined_frac[_l]``."""
    keep = {k: stats[k].float() for k in ("positive_refined_frac", "negative_refined_frac")}
    return expand_stage_terms(prefix, keep)
