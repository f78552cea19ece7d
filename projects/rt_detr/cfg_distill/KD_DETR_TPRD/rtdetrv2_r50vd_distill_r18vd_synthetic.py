"""KD-DETR + TPRD, RT-DETRv2-L (R50vd) -> RT-DETRv2-S (R18vd), synthetic (docs/methods.md#kd-detr, #tprd-variants)."""
from ..KD_DETR.rtdetrv2_r50vd_distill_r18vd_synthetic import *  # noqa: F401,F403

model.methods.kd_detr.refine = True
model.methods.kd_detr.weights["specific_class"] = 2.0
