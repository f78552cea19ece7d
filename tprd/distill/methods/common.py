"""What the prediction-level methods share: their TPRD options, the stage-count check and the
TPRD targets of a teacher group.

* :class:`TPRDOptions`: ``refine`` and the options that go with it, one object per method
  (``method.tprd``);
* :func:`check_same_stages`: student stage ``l`` is paired with teacher stage ``l``;
* :func:`tprd_refine_and_targets`: refined teacher predictions, the dense matched-GT index and the
  padded GT labels of one teacher group (what TPRD-CKD needs);
* :func:`tprd_stats`: the refinement shares as named per-stage statistics.

See docs/methods.md, "TPRD" (#tprd), for what the refinement does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from torch import Tensor, nn

from tprd.distill.tprd import build_match_index, pad_ground_truth, refine_teacher_predictions
from tprd.modeling.detector import DETRDetector
from tprd.modeling.outputs import StagePredictions

from .base import DistillContext, expand_stage_terms

__all__ = ["TPRDOptions", "check_same_stages", "tprd_refine_and_targets", "tprd_stats"]


@dataclass
class TPRDOptions:
    """The TPRD switch of a prediction-level method and the options that go with it.

    Attributes:
        refine: distil towards the TPRD-refined teacher (the ``_TPRD`` configs) with TPRD-CKD as
            the class term; ``False``: the method as published.
        matcher: the teacher-to-GT matcher ``M_l`` of the refinement; ``None``: focal Hungarian with
            costs class 2, L1 5, GIoU 2.
        skip_empty_images: leave an image without GT out of the refinement, as the reference does
            (docs/methods.md, #differences-from-the-reference).
        alpha, beta: TPRD-CKD weights of its target-class and non-target-class parts.
        soft_costs: ``(class, L1, GIoU)`` costs of the soft student-teacher matcher (used by the
            methods that soft-match).
    """

    refine: bool = False
    matcher: Optional[nn.Module] = None
    skip_empty_images: bool = False
    alpha: float = 1.0
    beta: float = 1.0
    soft_costs: Tuple[float, float, float] = (1.0, 5.0, 2.0)

    def __post_init__(self) -> None:
        self.refine = bool(self.refine)
        if self.matcher is None:
            from tprd.modeling.matcher import HungarianMatcher

            self.matcher = HungarianMatcher(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0)
        self.skip_empty_images = bool(self.skip_empty_images)
        self.alpha = float(self.alpha)
        self.beta = float(self.beta)
        if len(self.soft_costs) != 3:
            raise ValueError(f"soft_costs must be (class, l1, giou), got {self.soft_costs}")
        self.soft_costs = tuple(float(c) for c in self.soft_costs)


def check_same_stages(student: DETRDetector, teacher: DETRDetector, method: str) -> None:
    ls, lt = student.num_stages, teacher.num_stages
    if ls != lt:
        raise ValueError(
            f"{method} pairs student stage l with teacher stage l, but the student has {ls} decoder "
            f"layers and the teacher {lt}; give both the same number of decoder layers"
        )


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
