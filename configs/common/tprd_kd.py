"""TPRD as a method of its own (``tprd_kd``; not in the reference, docs/methods.md#tprd-kd).

Per decoder stage: the soft matcher B3 (costs 1 / 5 / 2) pairs the student's queries with the
TPRD-refined teacher stage (B1 matcher costs 2 / 5 / 2, focal alpha 0.25, gamma 2); class term
TPRD-CKD with positives mapped through the alignment, L1 and GIoU towards the refined boxes, all
``/ (B*N)``. Weights class 3.0 / L1 5.0 / GIoU 2.0. ``refine=False`` gives raw teacher targets with
the soft-BCE class term (B4), to measure TPRD's own contribution.

Used as ``model.methods.tprd_kd`` by ``projects/<det>/cfg_distill/{FGD,FitNet,MGD}_TPRD/`` (added to
the feature method) and ``projects/<det>/cfg_distill/TPRD/`` (alone).
"""
from tprd.config import LazyCall as L
from tprd.distill import TPRDKD
from tprd.modeling.matcher import HungarianMatcher

tprd_kd = L(TPRDKD)(
    weights={"class": 3.0, "l1": 5.0, "giou": 2.0},
    refine=True,
    class_kd="decoupled",  # class KD with refine: decoupled (TPRD-CKD), sigmoid, decoupled+bce
    matcher=L(HungarianMatcher)(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, alpha=0.25, gamma=2.0),
    soft_costs=[1.0, 5.0, 2.0],
)
