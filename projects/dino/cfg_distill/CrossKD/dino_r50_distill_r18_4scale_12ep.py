"""CrossKD, DINO (4-scale) R50 -> R18, COCO, 12 epochs (docs/methods.md#crosskd)."""
from tprd.config import get_config

from ..base.dino_r50_distill_r18_4scale_12ep import (  # noqa: F401
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

# the reference's CrossKD weights and matchers, the same for the three detectors
model.methods = {"crosskd": get_config("common/crosskd.py").crosskd}
train.eval_period = 5000
