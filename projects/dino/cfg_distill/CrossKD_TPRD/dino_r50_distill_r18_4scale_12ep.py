"""CrossKD + TPRD, DINO (4-scale) R50 -> R18, COCO.

The baseline ``../CrossKD/dino_r50_distill_r18_4scale_12ep.py`` with
refine=True and the class weight 1.0 -> 3.0. The reference has no CrossKD_TPRD; this variant
is ours: the crossed predictions are matched against, and distilled towards, the refined teacher
stage-l predictions; the class term is TPRD-CKD with positives mapped through the alignment
(docs/methods.md#tprd-alignment), boxes go towards the refined boxes; class 3.0 as D3ETR_TPRD / QSKD_TPRD (chosen, not tuned).

Per stage the teacher's predictions are refined with TPRD (one B1 matching per stage), the soft
matcher pairs the crossed predictions with the refined ones and the class term is TPRD-CKD
(Σ/(B·N)). Per-stage refinement shares are logged as ``tprd_crosskd_*``.
"""
from ..CrossKD.dino_r50_distill_r18_4scale_12ep import *  # noqa: F401,F403

model.methods.crosskd.refine = True
model.methods.crosskd.weights["class"] = 3.0
