"""KD-DETR + TPRD, DAB-DETR R50 -> R18, synthetic (docs/methods.md#kd-detr, #tprd-variants)."""
from ..KD_DETR.dab_detr_r50_distill_r18_synthetic import *  # noqa: F401,F403

model.methods.kd_detr.refine = True
