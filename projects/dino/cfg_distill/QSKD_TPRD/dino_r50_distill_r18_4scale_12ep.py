"""QSKD + TPRD, DINO (4-scale) R50 -> R18, COCO.

The baseline ``../QSKD/dino_r50_distill_r18_4scale_12ep.py`` with
refine=True and the pair-KD class weight 1.0 -> 3.0 (docs/methods.md#tprd-variants).

Selection and pairing stay on the raw teacher outputs; per stage the targets at the paired
teacher queries are the TPRD-refined predictions, the class term is TPRD-CKD (mean over pairs,
positives = the positive pairs); the memory term stays raw. Per-stage refinement shares are
logged as ``tprd_qskd_*``.
"""
from ..QSKD.dino_r50_distill_r18_4scale_12ep import *  # noqa: F401,F403

model.methods.qskd.refine = True
model.methods.qskd.weights["class"] = 3.0
