"""D³ETR, RT-DETRv2-L (R50vd) -> RT-DETRv2-S (R18vd), VOC (docs/methods.md#d3etr)."""
from ..base.rtdetrv2_r50vd_distill_r18vd_voc import (  # noqa: F401
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)
from .rtdetrv2_r50vd_distill_r18vd_coco import model as method_config

model.methods = method_config.methods
del method_config
