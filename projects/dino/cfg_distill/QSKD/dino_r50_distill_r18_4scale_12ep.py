"""QSKD, DINO (4-scale) R50 -> R18, COCO, 12 epochs (docs/methods.md#qskd)."""
from tprd.config import get_config

from ..base.dino_r50_distill_r18_4scale_12ep import (  # noqa: F401
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

# the reference's QSKD weights and matchers, the same for the three detectors
model.methods = {"qskd": get_config("common/qskd.py").qskd}
train.eval_period = 5000
