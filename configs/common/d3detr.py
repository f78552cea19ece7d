"""D³ETR as the reference configures it (docs/methods.md#d3detr, #weights), the same for the three detectors.

MixMatcher per decoder stage: the adaptive group (soft matcher B3, costs 1 / 5 / 2, student main
queries <-> teacher main queries) and the fixed group (the student decodes the teacher's initial
queries, identity alignment), each with prediction KD (class 1.0 / L1 5.0 / GIoU 2.0, / (B*N)),
self-attention distillation (10000) and cross-attention distillation (1000). The B1 matcher (2 / 5 /
2, focal alpha 0.25, gamma 2) is used only by TPRD. Used as ``model.methods = {"d3detr": ...}`` by
``projects/<det>/cfg_distill/D3DETR/*.py``; the ``_TPRD`` configs set ``refine=True`` and
``weights["class"] = weights["fixed_class"] = 3.0``.

DAB-DETR and DINO keep the Deformable DETR weights (the reference has D³ETR on Deformable DETR only).
Note that the cross-attention maps are summed over a group's queries, so with DINO's 900 queries
they carry 3x the mass of 300-query maps and the squared term is correspondingly larger.
"""
from tprd.config import LazyCall as L
from tprd.distill import D3DETR
from tprd.modeling.matcher import HungarianMatcher

d3detr = L(D3DETR)(
    weights={
        "class": 1.0,
        "l1": 5.0,
        "giou": 2.0,
        "self_attn": 10000.0,
        "cross_attn": 1000.0,
        "fixed_class": 1.0,
        "fixed_l1": 5.0,
        "fixed_giou": 2.0,
        "fixed_self_attn": 10000.0,
        "fixed_cross_attn": 1000.0,
    },
    refine=False,
    class_kd="decoupled",  # class KD with refine: decoupled (TPRD-CKD), sigmoid, decoupled+bce
    matcher=L(HungarianMatcher)(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, alpha=0.25, gamma=2.0),
    soft_costs=[1.0, 5.0, 2.0],
)
