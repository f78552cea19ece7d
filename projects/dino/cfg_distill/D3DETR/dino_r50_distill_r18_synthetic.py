"""D³ETR, DINO (4-scale) R50 -> R18, synthetic (docs/methods.md#d3detr)."""
from ..base.dino_r50_distill_r18_synthetic import (  # noqa: F401
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)
from .dino_r50_distill_r18_4scale_12ep import model as method_config

model.methods = method_config.methods
del method_config
