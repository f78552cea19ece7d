"""MGD + TPRD, Deformable DETR R50 -> R18, COCO (docs/methods.md#mgd, #tprd-variants)."""
from tprd.config import get_config

from ..MGD.deformable_detr_r50_distill_r18_50ep import *  # noqa: F401,F403

model.methods.tprd_kd = get_config("common/tprd_kd.py").tprd_kd
