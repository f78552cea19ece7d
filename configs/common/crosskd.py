"""CrossKD as the reference configures it (docs/methods.md#crosskd), the same for the three detectors.

The student's encoder memory is decoded by the frozen teacher's post-encoder path (gradients flow
through the teacher into the student's encoder, neck and backbone); per decoder stage the crossed
predictions are soft-Hungarian matched (costs 1 / 5 / 2) to the teacher's own and distilled with
soft-BCE / L1 / GIoU, weights 1.0 / 5.0 / 2.0, ``/ (B*N)``. Used as
``model.methods = {"crosskd": ...}`` by ``projects/<det>/cfg_distill/CrossKD/*.py``; the ``_TPRD``
configs (ours; the reference has none) set ``refine=True`` and ``weights["class"] = 3.0``. The B1
matcher (costs 2 / 5 / 2, focal alpha 0.25, gamma 2) is only used by the TPRD variant.
"""
from tprd.config import LazyCall as L
from tprd.distill import CrossKD
from tprd.modeling.matcher import HungarianMatcher

crosskd = L(CrossKD)(
    weights={"class": 1.0, "l1": 5.0, "giou": 2.0},
    refine=False,
    class_kd="decoupled",  # class KD with refine: decoupled (TPRD-CKD), sigmoid, decoupled+bce
    matcher=L(HungarianMatcher)(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, alpha=0.25, gamma=2.0),
    soft_costs=[1.0, 5.0, 2.0],
)
