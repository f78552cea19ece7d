"""KD-DETR + TPRD, DINO (4-scale) R50 -> R18, synthetic.

The baseline ``../KD_DETR/dino_r50_distill_r18_synthetic.py`` with
refine=True and specific class weight 4.0 -> 2.0 (docs/methods.md#tprd-variants). The general points keep the
baseline's CPU-sized table of 16 (the COCO config reduces them 900 -> 300).

How TPRD changes the method: see ``dino_r50_distill_r18_4scale_12ep.py``,
the COCO config of this folder.
"""
from ..KD_DETR.dino_r50_distill_r18_synthetic import *  # noqa: F401,F403

model.methods.kd_detr.refine = True
model.methods.kd_detr.weights["specific_class"] = 2.0
