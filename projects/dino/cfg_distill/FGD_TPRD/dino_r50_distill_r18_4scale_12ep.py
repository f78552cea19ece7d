"""FGD + TPRD, DINO (4-scale) R50 -> R18, COCO.

The baseline ``../FGD/dino_r50_distill_r18_4scale_12ep.py`` plus the stand-alone TPRD method ``tprd_kd``
(``configs/common/tprd_kd.py``): per decoder stage the student's queries are soft-matched to the
TPRD-refined teacher predictions and distilled with TPRD-CKD (class 3.0), L1 (5.0) and GIoU (2.0),
all / (B*N). The teacher now runs its whole transformer (tprd_kd needs its per-stage predictions).
Refinement shares are logged as ``tprd_tprd_kd_*``. Ours: the reference has no TPRD variant of
FGD (docs/methods.md#tprd-variants).
"""
from tprd.config import get_config

from ..FGD.dino_r50_distill_r18_4scale_12ep import *  # noqa: F401,F403

model.methods.tprd_kd = get_config("common/tprd_kd.py").tprd_kd
