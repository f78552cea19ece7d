"""DETRDistill + TPRD, RT-DETRv2-L (R50vd) -> RT-DETRv2-S (R18vd), COCO (docs/methods.md#detrdistill, #tprd-variants)."""
from ..DETRDistill.rtdetrv2_r50vd_distill_r18vd_coco import *  # noqa: F401,F403

model.methods.detrdistill.refine = True
model.methods.detrdistill.weights["class"] = 4.0
