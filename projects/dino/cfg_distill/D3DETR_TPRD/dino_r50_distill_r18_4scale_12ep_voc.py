"""D³ETR + TPRD, DINO (4-scale) R50 -> R18, VOC.

The baseline ``../D3DETR/dino_r50_distill_r18_4scale_12ep_voc.py`` with refine=True and the class weights of both
groups 1.0 -> 3.0 (docs/methods.md#tprd-variants).

How TPRD changes the method: see ``dino_r50_distill_r18_4scale_12ep.py``,
the COCO config of this folder.
"""
from ..D3DETR.dino_r50_distill_r18_4scale_12ep_voc import *  # noqa: F401,F403

model.methods.d3detr.refine = True
model.methods.d3detr.weights["class"] = 3.0
model.methods.d3detr.weights["fixed_class"] = 3.0
