"""CrossKD + TPRD, RT-DETRv2-L (R50vd) -> RT-DETRv2-S (R18vd), COCO (docs/methods.md#crosskd, #tprd-variants)."""
from ..CrossKD.rtdetrv2_r50vd_distill_r18vd_coco import *  # noqa: F401,F403

model.methods.crosskd.refine = True
model.methods.crosskd.weights["class"] = 3.0
