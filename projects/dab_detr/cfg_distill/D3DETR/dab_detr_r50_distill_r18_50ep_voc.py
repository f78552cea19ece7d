"""D³ETR, DAB-DETR R50 -> R18, VOC (docs/methods.md#d3detr)."""
from ..base.dab_detr_r50_distill_r18_50ep_voc import (  # noqa: F401
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)
from .dab_detr_r50_distill_r18_50ep import model as method_config

model.methods = method_config.methods
del method_config
