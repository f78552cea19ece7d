"""KD-DETR + TPRD, DINO (4-scale) R50 -> R18, VOC.

The baseline ``../KD_DETR/dino_r50_distill_r18_4scale_12ep_voc.py`` with
refine=True, specific class weight 4.0 -> 2.0,
general points 900 -> 300 (docs/methods.md#tprd-variants).

How TPRD changes the method: see ``dino_r50_distill_r18_4scale_12ep.py``,
the COCO config of this folder.
"""
from ..KD_DETR.dino_r50_distill_r18_4scale_12ep_voc import *  # noqa: F401,F403

model.methods.kd_detr.refine = True
model.methods.kd_detr.weights["specific_class"] = 2.0
model.methods.kd_detr.general_points = 300
