"""FitNet, DINO (4-scale) R50 -> R18, COCO, 12 epochs (docs/methods.md#fitnet).

FitNet: per neck level a 1x1 adapter on the student map and the MSE to the teacher
map, divided again by the batch size (docs/methods.md#diff-15); weight 10.
The 4 neck levels are imitated; the teacher runs only to its neck (docs/methods.md#diff-14).
Not in the reference (its feature methods are Deformable DETR only).
All settings in ``configs/common/feature_kd.py``.
"""
from tprd.config import get_config

from ..base.dino_r50_distill_r18_4scale_12ep import (  # noqa: F401
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

model.methods = {"fitnet": get_config("common/feature_kd.py").fitnet}
