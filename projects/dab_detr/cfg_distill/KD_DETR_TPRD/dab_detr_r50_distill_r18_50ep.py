"""KD-DETR + TPRD, DAB-DETR R50 -> R18, COCO.

The baseline ``../KD_DETR/dab_detr_r50_distill_r18_50ep.py`` with
refine=True only (no weight change in docs/methods.md#tprd-variants).

The specific (teacher-query) group is distilled towards the TPRD-refined teacher predictions of each
stage with TPRD-CKD as class term and point weights from the refined logits; the general group is
unchanged. Per-stage refinement shares are logged as ``tprd_kd_detr_specific_*``.
"""
from ..KD_DETR.dab_detr_r50_distill_r18_50ep import *  # noqa: F401,F403

model.methods.kd_detr.refine = True
