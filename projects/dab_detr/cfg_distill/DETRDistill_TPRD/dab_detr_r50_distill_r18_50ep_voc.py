"""DETRDistill + TPRD, DAB-DETR R50 -> R18, VOC.

The baseline ``../DETRDistill/dab_detr_r50_distill_r18_50ep_voc.py`` with
refine=True and the matching-KD class weight 1.0 -> 4.0 (docs/methods.md#tprd-variants).

How TPRD changes the method: see ``dab_detr_r50_distill_r18_50ep.py``,
the COCO config of this folder.
"""
from ..DETRDistill.dab_detr_r50_distill_r18_50ep_voc import *  # noqa: F401,F403

model.methods.detrdistill.refine = True
model.methods.detrdistill.weights["class"] = 4.0
