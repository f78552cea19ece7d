"""TPRD as a method of its own (``tprd_kd``): matched prediction distillation towards the
TPRD-refined teacher (docs/methods.md#tprd-kd).

At every decoder stage ``l`` (student stage ``l`` <-> its paired teacher stage, ``l`` for equal
depths; docs/methods.md#stage-pairing):

1. ``refine=True`` (default): the teacher's stage-``l`` predictions are refined with TPRD
   (:func:`~tprd.distill.tprd.refine_teacher_predictions`, B1 matching ``M_l`` of the raw stage);
   ``refine=False``: the raw teacher stage-``l`` predictions are the targets.
2. The soft matcher B3 pairs the student's main-group queries with the (refined) teacher queries: a
   full permutation ``π`` for equal query counts, ``min(Ns, Nt)`` pairs otherwise.
3. ``class``: TPRD-CKD (docs/methods.md#tprd-ckd) with positives mapped through the alignment (pair ``n`` is positive
   iff ``π(n) ∈ M_l``, with the class of the GT matched to ``π(n)``, docs/methods.md#tprd-alignment); with
   ``refine=False`` the soft-BCE class term of B4. ``l1``, ``giou``: ``Σ_4 |b_s − b_t|`` and
   ``1 − GIoU`` towards the (refined) teacher boxes.
4. Every term is summed over the pairs and divided by ``B·Ns``.

This is exactly DETRDistill_TPRD's matching-KD part, so both use :func:`~.aligned_kd.matching_kd`
(one copy).
As a method it composes with any other (``FGD_TPRD`` = ``fgd`` + ``tprd_kd``) or runs alone
(the ``TPRD`` configs, the pure-TPRD ablation); ``refine=False`` measures what the refinement
itself adds. Neither composition exists in the reference (docs/methods.md#tprd-variants: no TPRD variant of FGD,
FitNet, MGD).
"""
from __future__ import annotations

from typing import Any, Dict, Optional

from torch import Tensor, nn

from .aligned_kd import matching_kd
from .base import DistillContext, DistillMethod, TPRDOptions
from .common import check_same_stages, tprd_stats

__all__ = ["TPRDKD"]


class TPRDKD(DistillMethod):
    """TPRD prediction distillation as a stand-alone method (method name ``tprd_kd``).

    Args:
        weights: ``class``, ``l1``, ``giou`` (default 3.0 / 5.0 / 2.0, the TPRD class weight of
            D³ETR/QSKD_TPRD with the usual box weights).
        **tprd: the TPRD options, kept as ``self.tprd`` (:class:`~.base.TPRDOptions`):
        refine: TPRD-refined targets + TPRD-CKD (default) or raw targets + soft-BCE (B4).
        matcher: B1 teacher–GT matcher (default focal Hungarian 2 / 5 / 2).
        soft_costs: ``(class, L1, GIoU)`` costs of the soft matcher B3 (1, 5, 2).
        skip_empty_images: TPRD parity flag (docs/methods.md#diff-5).
        alpha, beta: TPRD-CKD weights of TCKD / NCKD (1, 1).

    Per-stage refinement shares go to :attr:`last_stats` as
    ``tprd_<name>_{positive,negative}_refined_frac[_l]``. Any student/teacher query counts work;
    the teacher needs at least as many decoder stages as the student (docs/methods.md#stage-pairing).
    """

    name = "tprd_kd"
    terms = ("class", "l1", "giou")
    needs = ("predictions",)

    def __init__(
        self,
        weights: Optional[Dict[str, float]] = None,
        name: Optional[str] = None,
        **tprd: Any,
    ):
        if weights is None:
            weights = {"class": 3.0, "l1": 5.0, "giou": 2.0}
        super().__init__(weights, name)
        self.tprd = TPRDOptions(**{"refine": True, **tprd})

    def check_models(self, student: nn.Module, teacher: nn.Module) -> None:
        check_same_stages(student, teacher, "tprd_kd")

    def losses(self, ctx: DistillContext) -> Dict[str, Tensor]:
        terms, stats = matching_kd(ctx, ctx.student_out.main, ctx.teacher_out.main, self.tprd, stages=ctx.teacher_stages)
        if stats is not None:
            self.last_stats = tprd_stats(f"tprd_{self.name}", stats)
        return terms

    def extra_repr(self) -> str:
        return f"name={self.name!r}, refine={self.tprd.refine}, weights={self.weights}"
