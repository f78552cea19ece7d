"""TPRD alone (``tprd_kd``), DINO (4-scale) R50 -> R18, COCO, 12 epochs (docs/methods.md#tprd-kd)."""
from tprd.config import get_config

from ..base.dino_r50_distill_r18_4scale_12ep import (  # noqa: F401
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

model.methods = {"tprd_kd": get_config("common/tprd_kd.py").tprd_kd}
