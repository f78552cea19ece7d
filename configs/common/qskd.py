"""QSKD as the reference configures it (docs/methods.md#qskd), the same for the three detectors.

Per decoder stage: GIoU-based group query selection (B1 matching of both models to the GT, costs
2 / 5 / 2; hard negatives = unmatched queries with max GIoU to a GT > 0), positive pairs by shared
GT, hard-negative pairs by soft Hungarian matching (costs 1 / 5 / 2), pair-averaged prediction
distillation (class 1.0 / L1 5.0 / GIoU 2.0) and attention-guided memory distillation (100) with the
teacher's per-query cross-attention maps of the same layer (``reference_stage_order=True``: the
reference's shifted stage/layer pairing). Used as ``model.methods = {"qskd": ...}`` by
``projects/<det>/cfg_distill/QSKD/*.py``; the ``_TPRD`` configs set ``refine=True`` and
``weights["class"] = 3.0``.
"""
from tprd.config import LazyCall as L
from tprd.distill import QSKD
from tprd.modeling.matcher import HungarianMatcher

qskd = L(QSKD)(
    weights={"class": 1.0, "l1": 5.0, "giou": 2.0, "feature": 100.0},
    refine=False,
    class_kd="decoupled",  # class KD with refine: decoupled (TPRD-CKD), sigmoid, decoupled+bce
    matcher=L(HungarianMatcher)(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, alpha=0.25, gamma=2.0),
    soft_costs=[1.0, 5.0, 2.0],
    giou_threshold=0.0,
    reference_stage_order=False,
)
