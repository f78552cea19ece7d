"""D³ETR, DAB-DETR R50 -> R18, COCO, 50 epochs (docs/methods.md#d3detr)."""
from tprd.config import get_config

from ..base.dab_detr_r50_distill_r18_50ep import (  # noqa: F401
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

# the reference's D³ETR weights, the same for the three detectors
model.methods = {"d3detr": get_config("common/d3detr.py").d3detr}
train.eval_period = 5000
