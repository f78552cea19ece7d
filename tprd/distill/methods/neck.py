"""What the feature-imitation methods (FGD, FitNet, MGD) share: the neck levels of a detector and
the (student, teacher) neck maps of an iteration.

A detector's ``neck`` tap is a list of ``[B,D,H_l,W_l]`` maps: the 4 ChannelMapper levels of
Deformable DETR and DINO, the single input projection of res5 of DAB-DETR. The methods build one
adapter set per level (the detector's ``num_neck_levels``) and pair the levels by position.
"""
from __future__ import annotations

from typing import List, Tuple

from torch import Tensor

from tprd.modeling.detector import DETRDetector

from .base import DistillContext

__all__ = ["neck_pairs", "check_same_necks"]


def check_same_necks(student: DETRDetector, teacher: DETRDetector, method: str) -> Tuple[int, int]:
    """``(levels, channels)`` shared by both models; ``ValueError`` naming the fix otherwise."""
    ls, lt = student.num_neck_levels, teacher.num_neck_levels
    ds, dt = student.embed_dim, teacher.embed_dim
    if ls != lt or ds != dt:
        raise ValueError(
            f"{method} imitates the teacher's neck maps level by level: the student has {ls} levels of {ds} "
            f"channels, the teacher {lt} of {dt}; use the same neck (num_outs / out_channels / embed_dim) in both"
        )
    return ls, ds


def neck_pairs(ctx: DistillContext, method: str) -> List[Tuple[Tensor, Tensor]]:
    """``[(student [B,D,H,W], teacher [B,D,H,W] detached)]`` per neck level."""
    neck_s = ctx.student_out.taps.get("neck") if ctx.student_out is not None else None
    neck_t = ctx.teacher_out.taps.get("neck") if ctx.teacher_out is not None else None
    if neck_s is None or neck_t is None:
        raise KeyError(f"{method} needs both models' neck maps (taps['neck'])")
    if len(neck_s) != len(neck_t):
        raise ValueError(f"{method}: student has {len(neck_s)} neck levels, teacher {len(neck_t)}")
    pairs = []
    for l, (fs, ft) in enumerate(zip(neck_s, neck_t)):
        if fs.shape != ft.shape:
            raise ValueError(
                f"{method}: neck level {l} differs in shape: student {tuple(fs.shape)} vs teacher {tuple(ft.shape)}"
            )
        pairs.append((fs, ft.detach()))
    return pairs
