"""DETRDistill as the reference configures it (docs/methods.md#detrdistill), the same for the three detectors.

Per decoder stage: soft-Hungarian matched prediction KD (class 1.0 / L1 5.0 / GIoU 2.0, / (B*N);
matcher costs 2 / 5 / 2 with focal alpha 0.25, gamma 2; soft costs 1 / 5 / 2), target-aware
neck-feature distillation (2.0, top-100 teacher entries per image) and query prior assignment (the
student decodes the teacher's queries with the teacher's GT matching as targets: class 1.0 / L1 5.0 /
GIoU 2.0). Used as ``model.methods = {"detrdistill": ...}`` by
``projects/<det>/cfg_distill/DETRDistill/*.py``; the ``_TPRD`` configs set ``refine=True`` and
``weights["class"] = 4.0``.
"""
from tprd.config import LazyCall as L
from tprd.distill import DETRDistill
from tprd.modeling.matcher import HungarianMatcher

detrdistill = L(DETRDistill)(
    weights={
        "class": 1.0,
        "l1": 5.0,
        "giou": 2.0,
        "target_aware": 2.0,
        "prior_class": 1.0,
        "prior_l1": 5.0,
        "prior_giou": 2.0,
    },
    refine=False,
    class_kd="decoupled",  # class KD with refine: decoupled (TPRD-CKD), sigmoid, decoupled+bce
    topk=100,
    matcher=L(HungarianMatcher)(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, alpha=0.25, gamma=2.0),
    soft_costs=[1.0, 5.0, 2.0],
)
