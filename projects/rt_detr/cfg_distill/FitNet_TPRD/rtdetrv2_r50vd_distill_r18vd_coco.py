"""FitNet + TPRD, RT-DETRv2-L (R50vd) -> RT-DETRv2-S (R18vd), COCO (docs/methods.md#fitnet, #tprd-variants)."""
from tprd.config import get_config

from ..FitNet.rtdetrv2_r50vd_distill_r18vd_coco import *  # noqa: F401,F403

model.methods.tprd_kd = get_config("common/tprd_kd.py").tprd_kd
