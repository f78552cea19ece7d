"""CrossKD, RT-DETRv2-L (R50vd) -> RT-DETRv2-S (R18vd), synthetic (docs/methods.md#crosskd)."""
from ..base.rtdetrv2_r50vd_distill_r18vd_synthetic import (  # noqa: F401
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)
from .rtdetrv2_r50vd_distill_r18vd_coco import model as method_config

model.methods = method_config.methods
del method_config
