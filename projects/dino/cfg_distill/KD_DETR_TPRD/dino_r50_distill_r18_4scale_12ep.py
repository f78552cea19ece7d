"""KD-DETR + TPRD, DINO (4-scale) R50 -> R18, COCO.

The baseline ``../KD_DETR/dino_r50_distill_r18_4scale_12ep.py`` with
refine=True, specific class weight 4.0 -> 2.0,
general points 900 -> 300 (docs/methods.md#tprd-variants).

The specific (teacher-query) group is distilled towards the TPRD-refined teacher predictions of each
stage with TPRD-CKD as class term and point weights from the refined logits; the general group is
unchanged. Per-stage refinement shares are logged as ``tprd_kd_detr_specific_*``.
"""
from ..KD_DETR.dino_r50_distill_r18_4scale_12ep import *  # noqa: F401,F403

model.methods.kd_detr.refine = True
model.methods.kd_detr.weights["specific_class"] = 2.0
model.methods.kd_detr.general_points = 300
