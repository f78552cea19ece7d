"""CrossKD + TPRD, Deformable DETR R50 -> R18, synthetic.

The baseline ``../CrossKD/deformable_detr_r50_distill_r18_synthetic.py`` with
refine=True and the class weight 1.0 -> 3.0. The reference has no CrossKD_TPRD; this variant
is ours: the crossed predictions are matched against, and distilled towards, the refined teacher
stage-l predictions; the class term is TPRD-CKD with positives mapped through the alignment
(docs/methods.md#tprd-alignment), boxes go towards the refined boxes; class 3.0 as D3ETR_TPRD / QSKD_TPRD (chosen, not tuned).

How TPRD changes the method: see ``deformable_detr_r50_distill_r18_50ep.py``,
the COCO config of this folder.
"""
from ..CrossKD.deformable_detr_r50_distill_r18_synthetic import *  # noqa: F401,F403

model.methods.crosskd.refine = True
model.methods.crosskd.weights["class"] = 3.0
