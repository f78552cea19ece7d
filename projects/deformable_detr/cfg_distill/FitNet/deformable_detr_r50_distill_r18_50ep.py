"""FitNet, Deformable DETR R50 -> R18, COCO, 50 epochs (docs/methods.md#fitnet).

FitNet: per neck level a 1x1 adapter on the student map and the MSE to the teacher
map, divided again by the batch size (docs/methods.md#diff-15); weight 10.
The 4 neck levels (strides 8-64) are imitated; the teacher runs only to its neck (docs/methods.md#diff-14).
All settings in ``configs/common/feature_kd.py``.
"""
from tprd.config import get_config

from ..base.deformable_detr_r50_distill_r18_50ep import (  # noqa: F401
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

model.methods = {"fitnet": get_config("common/feature_kd.py").fitnet}
