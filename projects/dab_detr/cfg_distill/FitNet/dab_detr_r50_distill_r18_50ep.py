"""FitNet, DAB-DETR R50 -> R18, COCO, 50 epochs (docs/methods.md#fitnet)."""
from tprd.config import get_config

from ..base.dab_detr_r50_distill_r18_50ep import (  # noqa: F401
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

model.methods = {"fitnet": get_config("common/feature_kd.py").fitnet}
