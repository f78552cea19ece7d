"""QSKD + TPRD, DAB-DETR R50 -> R18, synthetic.

The baseline ``../QSKD/dab_detr_r50_distill_r18_synthetic.py`` with
refine=True and the pair-KD class weight 1.0 -> 3.0 (docs/methods.md#tprd-variants).

How TPRD changes the method: see ``dab_detr_r50_distill_r18_50ep.py``,
the COCO config of this folder.
"""
from ..QSKD.dab_detr_r50_distill_r18_synthetic import *  # noqa: F401,F403

model.methods.qskd.refine = True
model.methods.qskd.weights["class"] = 3.0
