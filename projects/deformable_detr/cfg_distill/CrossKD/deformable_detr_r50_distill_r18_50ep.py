"""CrossKD, Deformable DETR R50 -> R18, COCO, 50 epochs (docs/methods.md#crosskd)."""
from tprd.config import get_config

from ..base.deformable_detr_r50_distill_r18_50ep import (  # noqa: F401
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

# the reference's CrossKD weights and matchers, the same for the three detectors
model.methods = {"crosskd": get_config("common/crosskd.py").crosskd}
train.eval_period = 30000
