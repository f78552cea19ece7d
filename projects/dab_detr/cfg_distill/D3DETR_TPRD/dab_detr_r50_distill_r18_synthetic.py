"""D³ETR + TPRD, DAB-DETR R50 -> R18, synthetic.

The baseline ``../D3DETR/dab_detr_r50_distill_r18_synthetic.py`` with refine=True and the class weights of both
groups 1.0 -> 3.0 (docs/methods.md#tprd-variants).

How TPRD changes the method: see ``dab_detr_r50_distill_r18_50ep.py``,
the COCO config of this folder.
"""
from ..D3DETR.dab_detr_r50_distill_r18_synthetic import *  # noqa: F401,F403

model.methods.d3detr.refine = True
model.methods.d3detr.weights["class"] = 3.0
model.methods.d3detr.weights["fixed_class"] = 3.0
