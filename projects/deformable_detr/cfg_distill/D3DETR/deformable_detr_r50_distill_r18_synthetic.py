"""D³ETR, Deformable DETR R50 -> R18, synthetic (docs/methods.md#d3detr)."""
from ..base.deformable_detr_r50_distill_r18_synthetic import (  # noqa: F401
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)
from .deformable_detr_r50_distill_r18_50ep import model as method_config

model.methods = method_config.methods
del method_config
