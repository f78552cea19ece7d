"""DETRDistill, Deformable DETR R50 -> R18, COCO, 50 epochs (docs/methods.md#detrdistill)."""
from tprd.config import get_config

from ..base.deformable_detr_r50_distill_r18_50ep import (  # noqa: F401
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

# the reference's DETRDistill weights and matcher, the same for the three detectors
model.methods = {"detrdistill": get_config("common/detrdistill.py").detrdistill}
train.eval_period = 30000
