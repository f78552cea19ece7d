"""CrossKD + TPRD, DAB-DETR R50 -> R18, synthetic (docs/methods.md#crosskd, #tprd-variants)."""
from ..CrossKD.dab_detr_r50_distill_r18_synthetic import *  # noqa: F401,F403

model.methods.crosskd.refine = True
model.methods.crosskd.weights["class"] = 3.0
