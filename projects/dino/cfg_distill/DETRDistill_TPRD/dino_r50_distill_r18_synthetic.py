"""DETRDistill + TPRD, DINO (4-scale) R50 -> R18, synthetic (docs/methods.md#detrdistill, #tprd-variants)."""
from ..DETRDistill.dino_r50_distill_r18_synthetic import *  # noqa: F401,F403

model.methods.detrdistill.refine = True
model.methods.detrdistill.weights["class"] = 4.0
