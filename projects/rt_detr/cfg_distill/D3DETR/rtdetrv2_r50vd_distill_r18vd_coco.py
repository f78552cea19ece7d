"""D³ETR, RT-DETRv2-L (R50vd) -> RT-DETRv2-S (R18vd), COCO (docs/methods.md#d3etr)."""
from tprd.config import get_config

from ..base.rtdetrv2_r50vd_distill_r18vd_coco import (  # noqa: F401
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

# the reference's D3ETR weights, as for the three detrex detectors
model.methods = {"d3detr": get_config("common/d3detr.py").d3detr}
