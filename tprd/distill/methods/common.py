"""What the prediction-level methods share: the stage pairing and the TPRD targets of a teacher
group (their TPRD options are :class:`~.base.TPRDOptions`).

* :func:`stage_pairing`: which teacher stage each student stage learns from (docs/methods.md#stage-pairing):
  the same stage for equal depths, else uniformly spread with final <-> final;
  :func:`check_same_stages` checks that a pair of models can be paired;
* :func:`paired_stages` / :func:`paired_matches`: a teacher stack / its per-stage matches cut to
  the paired stages;
* :func:`tprd_refine_and_targets`: refined teacher predictions, the dense matched-GT index and the
  padded GT labels of one teacher group (what TPRD-CKD needs), refined over **all** teacher stages
  and then cut to the paired ones;
* :func:`tprd_stats`: the refinement shares as named per-stage statistics.

See docs/methods.md#tprd for what the refinement does.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor

from tprd.distill.tprd import build_match_index, pad_ground_truth, refine_teacher_predictions
from tprd.modeling.detector import DETRDetector
from tprd.modeling.outputs import StagePredictions

from .base import DistillContext, TPRDOptions, expand_stage_terms

__all__ = [
    "STAGE_PAIRINGS",
    "stage_pairing",
    "check_same_stages",
    "check_same_width",
    "paired_stages",
    "paired_matches",
    "tprd_refine_and_targets",
    "tprd_stats",
]

#: The named rules of :func:`stage_pairing` (an explicit list of teacher stages is accepted too).
STAGE_PAIRINGS = ("uniform", "last")

Pairing = Union[str, Sequence[int]]


def stage_pairing(num_student: int, num_teacher: int, rule: Pairing = "uniform") -> List[int]:
    """The teacher stage ``τ(l)`` each student stage ``l = 0 .. Ls-1`` learns from (0-based).

    * equal depths: ``τ(l) = l`` whatever the rule (every shipped config of the three detrex
      detectors);
    * ``"uniform"`` (default): ``τ(l) = ⌊(l+1)·Lt/Ls⌋ − 1``, the teacher stages spread evenly with
      the final stage paired with the final stage (RT-DETRv2-L -> S, 6 -> 3: ``[1, 3, 5]``;
      6 -> 4: ``[0, 2, 3, 5]``);
    * ``"last"``: the last ``Ls`` teacher stages, ``τ(l) = Lt − Ls + l`` (6 -> 3: ``[3, 4, 5]``);
    * a list of ``Ls`` strictly increasing teacher stages.

    A teacher with fewer stages than the student is refused (``ValueError``): a student stage would
    have no teacher stage of its own.
    """
    ls, lt = int(num_student), int(num_teacher)
    if ls < 1 or lt < 1:
        raise ValueError(f"stage pairing needs at least one stage on each side, got student {ls}, teacher {lt}")
    if lt < ls:
        raise ValueError(
            f"the student has {ls} decoder layers and the teacher {lt}: every student stage needs a teacher stage of "
            "its own (docs/methods.md#stage-pairing), so give the teacher at least as many decoder layers as the student"
        )
    if not isinstance(rule, str):
        stages = [int(s) for s in rule]
        if len(stages) != ls or any(b <= a for a, b in zip(stages, stages[1:])) or stages[0] < 0 or stages[-1] >= lt:
            raise ValueError(f"stage_pairing {list(rule)}: expected {ls} strictly increasing teacher stages in 0..{lt - 1}")
        return stages
    if rule not in STAGE_PAIRINGS:
        raise ValueError(f"stage_pairing must be one of {STAGE_PAIRINGS} or a list of teacher stages, got {rule!r}")
    if ls == lt:
        return list(range(ls))
    if rule == "last":
        return [lt - ls + l for l in range(ls)]
    return [(l + 1) * lt // ls - 1 for l in range(ls)]


def check_same_stages(student: DETRDetector, teacher: DETRDetector, method: str) -> None:
    """The models can be stage-paired (:func:`stage_pairing`): the teacher has at least as many
    decoder stages as the student."""
    try:
        stage_pairing(student.num_stages, teacher.num_stages)
    except ValueError as e:
        raise ValueError(f"{method}: {e}") from None


def check_same_width(student: DETRDetector, teacher: DETRDetector, error: str) -> int:
    """The ``embed_dim`` student and teacher share; ``ValueError(error)`` when they differ (``error``
    is formatted with the student's width ``ds`` and the teacher's ``dt``)."""
    ds, dt = student.embed_dim, teacher.embed_dim
    if ds != dt:
        raise ValueError(error.format(ds=ds, dt=dt))
    return ds


def _is_identity(stages: Optional[Sequence[int]], num_teacher: int) -> bool:
    return stages is None or list(stages) == list(range(num_teacher))


def paired_stages(preds: StagePredictions, stages: Optional[Sequence[int]]) -> StagePredictions:
    """``preds`` (a teacher stack ``[Lt,B,Q,·]``) cut to the teacher stages ``stages`` (``None``:
    unchanged), so that index ``l`` is the teacher stage paired with student stage ``l``."""
    if _is_identity(stages, preds.logits.shape[0]):
        return preds
    idx = torch.as_tensor(list(stages), dtype=torch.long, device=preds.logits.device)

    def cut(x):
        return None if x is None or not isinstance(x, Tensor) else x.index_select(0, idx.to(x.device))

    return StagePredictions(cut(preds.logits), cut(preds.boxes), cut(preds.hidden), cut(preds.references))


def paired_matches(matches: Sequence, stages: Optional[Sequence[int]]) -> List:
    """Per-stage matches ``[Lt][B]`` cut to the paired teacher stages."""
    return list(matches) if stages is None else [matches[int(k)] for k in stages]


def tprd_refine_and_targets(ctx: DistillContext, teacher: StagePredictions, options: TPRDOptions, key: str,
                            stages: Optional[Sequence[int]] = None):
    """TPRD on a teacher group: ``M_k`` per teacher stage (``options.matcher``; cached in ``ctx``
    under ``key``), refined logits and boxes, the dense matched-GT index (−1 = negative), padded GT
    labels ``[B,G]`` and the refinement statistics.

    The refinement always runs over the **whole** teacher stack, so a refined stage borrows from
    every earlier teacher stage, paired or not (docs/methods.md#stage-pairing); the results are then
    cut to the teacher stages ``stages`` (``None``: all), giving ``[Ls,B,Qt,·]`` tensors and
    per-stage statistics in student stage order."""
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
        if not _is_identity(stages, logits.shape[0]):
            idx = torch.as_tensor(list(stages), dtype=torch.long, device=logits.device)
            logits, boxes, match_index = (x.index_select(0, idx) for x in (logits, boxes, match_index))
            stats = {k: v.index_select(0, idx.to(v.device)) if isinstance(v, Tensor) and v.dim() >= 1 else v
                     for k, v in stats.items()}
    return logits, boxes, match_index, labels_pad, stats


def tprd_stats(prefix: str, stats: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Per-stage refinement shares as ``tprd_<...>_{positive,negative}_refined_frac[_l]``."""
    keep = {k: stats[k].float() for k in ("positive_refined_frac", "negative_refined_frac")}
    return expand_stage_terms(prefix, keep)
