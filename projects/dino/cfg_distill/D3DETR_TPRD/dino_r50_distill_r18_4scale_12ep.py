"""D³ETR + TPRD, DINO (4-scale) R50 -> R18, COCO (docs/methods.md#d3detr, #tprd-variants)."""
from ..D3DETR.dino_r50_distill_r18_4scale_12ep import *  # noqa: F401,F403

model.methods.d3detr.refine = True
model.methods.d3detr.weights["class"] = 3.0
model.methods.d3detr.weights["fixed_class"] = 3.0
