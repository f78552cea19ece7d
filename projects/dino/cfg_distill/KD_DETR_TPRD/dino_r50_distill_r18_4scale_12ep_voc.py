"""KD-DETR + TPRD, DINO (4-scale) R50 -> R18, VOC (docs/methods.md#kd-detr, #tprd-variants)."""
from ..KD_DETR.dino_r50_distill_r18_4scale_12ep_voc import *  # noqa: F401,F403

model.methods.kd_detr.refine = True
model.methods.kd_detr.weights["specific_class"] = 2.0
model.methods.kd_detr.general_points = 300
