"""D³ETR + TPRD, RT-DETRv2-L (R50vd) -> RT-DETRv2-S (R18vd), COCO (docs/methods.md#d3etr, #tprd-variants)."""
from ..D3DETR.rtdetrv2_r50vd_distill_r18vd_coco import *  # noqa: F401,F403

model.methods.d3detr.refine = True
model.methods.d3detr.weights["class"] = 3.0
model.methods.d3detr.weights["fixed_class"] = 3.0
