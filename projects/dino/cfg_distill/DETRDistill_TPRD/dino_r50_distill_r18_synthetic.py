"""DETRDistill + TPRD, DINO (4-scale) R50 -> R18, synthetic.

The baseline ``../DETRDistill/dino_r50_distill_r18_synthetic.py`` with
refine=True and the matching-KD class weight 1.0 -> 4.0 (docs/methods.md#tprd-variants).

How TPRD changes the method: see ``dino_r50_distill_r18_4scale_12ep.py``,
the COCO config of this folder.
"""
from ..DETRDistill.dino_r50_distill_r18_synthetic import *  # noqa: F401,F403

model.methods.detrdistill.refine = True
model.methods.detrdistill.weights["class"] = 4.0
