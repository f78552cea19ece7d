"""KD-DETR + TPRD, DAB-DETR R50 -> R18, VOC (docs/methods.md#kd-detr, #tprd-variants)."""
from ..KD_DETR.dab_detr_r50_distill_r18_50ep_voc import *  # noqa: F401,F403

model.methods.kd_detr.refine = True
