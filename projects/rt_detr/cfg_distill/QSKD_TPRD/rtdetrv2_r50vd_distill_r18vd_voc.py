"""QSKD + TPRD, RT-DETRv2-L (R50vd) -> RT-DETRv2-S (R18vd), VOC (docs/methods.md#qskd, #tprd-variants)."""
from ..QSKD.rtdetrv2_r50vd_distill_r18vd_voc import *  # noqa: F401,F403

model.methods.qskd.refine = True
model.methods.qskd.weights["class"] = 3.0
