"""D³ETR + TPRD, Deformable DETR R50 -> R18, synthetic (docs/methods.md#d3detr, #tprd-variants)."""
from ..D3DETR.deformable_detr_r50_distill_r18_synthetic import *  # noqa: F401,F403

model.methods.d3detr.refine = True
model.methods.d3detr.weights["class"] = 3.0
model.methods.d3detr.weights["fixed_class"] = 3.0
