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

__all__ = ["neck_pairs", "check_same_necks", "batch_divisor", "REFERENCE_PROCESSES"]


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


#: The number of processes of the reference's documented run (2 GPUs x 8 images = total batch 16),
#: whose images per process FitNet and MGD divide their mean-reduced MSE by once more.
REFERENCE_PROCESSES = 2


def batch_divisor(local_batch: int, reference_processes: int = REFERENCE_PROCESSES) -> float:
    """The ``B`` FitNet and MGD divide their mean-reduced MSE by again: the images per process of a
    run of ``reference_processes`` processes at this run's total batch, i.e.
    ``local_batch * world_size / reference_processes``.

    Why not the images of this process, as the reference code does: under DDP every process's
    term is divided by its own batch and the gradients are averaged over processes, so the
    effective scale would grow with the number of processes (twice the 1-process term on two
    processes at the same total batch, eight times on eight). Taking the total batch (all ranks
    hold equal batches; the train loader splits ``total_batch_size`` evenly) makes the term the
    same on any number of processes, and with ``reference_processes = 2`` it equals the
    reference's value at its 2 x 8 setting, where the weight 10 was tuned. A user reproducing a
    reference run made on ``N`` GPUs sets ``reference_processes=N`` in the method's config.
    """
    from tprd.utils import comm

    if int(reference_processes) < 1:
        raise ValueError(f"reference_processes must be >= 1, got {reference_processes}")
    return float(local_batch) * comm.get_world_size() / int(reference_processes)
