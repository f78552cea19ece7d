"""FGD, DINO (4-scale) R50 -> R18, COCO, 12 epochs (docs/methods.md#fgd)."""
from tprd.config import get_config

from ..base.dino_r50_distill_r18_4scale_12ep import (  # noqa: F401
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

model.methods = {"fgd": get_config("common/feature_kd.py").fgd}
