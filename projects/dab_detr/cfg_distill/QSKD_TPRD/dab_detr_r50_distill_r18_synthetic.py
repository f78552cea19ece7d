"""QSKD + TPRD, DAB-DETR R50 -> R18, synthetic (docs/methods.md#qskd, #tprd-variants)."""
from ..QSKD.dab_detr_r50_distill_r18_synthetic import *  # noqa: F401,F403

model.methods.qskd.refine = True
model.methods.qskd.weights["class"] = 3.0
