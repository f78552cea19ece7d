"""QSKD, RT-DETRv2-L (R50vd) -> RT-DETRv2-S (R18vd), COCO (docs/methods.md#qskd)."""
from tprd.config import get_config

from ..base.rtdetrv2_r50vd_distill_r18vd_coco import (  # noqa: F401
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

# the reference's QSKD weights and matchers, as for the three detrex detectors
model.methods = {"qskd": get_config("common/qskd.py").qskd}
