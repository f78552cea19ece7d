"""TPRD alone (``tprd_kd``), RT-DETRv2-L (R50vd) -> RT-DETRv2-S (R18vd), COCO (docs/methods.md#tprd-kd)."""
from tprd.config import get_config

from ..base.rtdetrv2_r50vd_distill_r18vd_coco import (  # noqa: F401
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

model.methods = {"tprd_kd": get_config("common/tprd_kd.py").tprd_kd}
