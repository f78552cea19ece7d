"""CrossKD, RT-DETRv2-L (R50vd) -> RT-DETRv2-S (R18vd), COCO (docs/methods.md#crosskd)."""
from tprd.config import get_config

from ..base.rtdetrv2_r50vd_distill_r18vd_coco import (  # noqa: F401
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

# the reference's CrossKD weights and matchers, as for the three detrex detectors
model.methods = {"crosskd": get_config("common/crosskd.py").crosskd}
