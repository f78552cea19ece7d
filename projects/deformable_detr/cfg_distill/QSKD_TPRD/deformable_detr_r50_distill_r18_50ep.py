"""QSKD + TPRD, Deformable DETR R50 -> R18, COCO (docs/methods.md#qskd, #tprd-variants)."""
from ..QSKD.deformable_detr_r50_distill_r18_50ep import *  # noqa: F401,F403

model.methods.qskd.refine = True
model.methods.qskd.weights["class"] = 3.0
