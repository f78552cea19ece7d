"""QSKD, Deformable DETR R50 -> R18, COCO, 50 epochs (docs/methods.md#qskd)."""
from tprd.config import get_config

from ..base.deformable_detr_r50_distill_r18_50ep import (  # noqa: F401
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

# the reference's QSKD weights and matchers, the same for the three detectors
model.methods = {"qskd": get_config("common/qskd.py").qskd}
train.eval_period = 5000
