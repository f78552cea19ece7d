"""MGD + TPRD, DAB-DETR R50 -> R18, synthetic (docs/methods.md#mgd, #tprd-variants)."""
from tprd.config import get_config

from ..MGD.dab_detr_r50_distill_r18_synthetic import *  # noqa: F401,F403

model.methods.tprd_kd = get_config("common/tprd_kd.py").tprd_kd
