"""DETRDistill + TPRD, DAB-DETR R50 -> R18, COCO.

The baseline ``../DETRDistill/dab_detr_r50_distill_r18_50ep.py`` with
refine=True and the matching-KD class weight 1.0 -> 4.0 (docs/methods.md#tprd-variants).

Per stage the teacher's predictions are refined with TPRD (one B1 matching per stage, shared with
the prior-assignment term), the soft matcher runs against the refined targets and the class term is
TPRD-CKD; the target-aware and prior-assignment terms stay raw. Per-stage refinement shares are
logged as ``tprd_detrdistill_*``.
"""
from ..DETRDistill.dab_detr_r50_distill_r18_50ep import *  # noqa: F401,F403

model.methods.detrdistill.refine = True
model.methods.detrdistill.weights["class"] = 4.0
