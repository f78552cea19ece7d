"""MGD + TPRD, DINO (4-scale) R50 -> R18, VOC (docs/methods.md#mgd, #tprd-variants)."""
from tprd.config import get_config

from ..MGD.dino_r50_distill_r18_4scale_12ep_voc import *  # noqa: F401,F403

model.methods.tprd_kd = get_config("common/tprd_kd.py").tprd_kd
