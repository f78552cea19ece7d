"""DETRDistill + TPRD, DAB-DETR R50 -> R18, VOC (docs/methods.md#detrdistill, #tprd-variants)."""
from ..DETRDistill.dab_detr_r50_distill_r18_50ep_voc import *  # noqa: F401,F403

model.methods.detrdistill.refine = True
model.methods.detrdistill.weights["class"] = 4.0
