"""MGD, Deformable DETR R50 -> R18, COCO, 50 epochs (docs/methods.md#mgd).

MGD: per neck level a 1x1 adapter, a random spatial mask (ratio 0.5; seeded from
train.seed and the iteration) and a 3x3-ReLU-3x3 generation block regressing the teacher map;
the MSE is divided again by the batch size (docs/methods.md#diff-15); weight 10.
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

model.methods = {"mgd": get_config("common/feature_kd.py").mgd}
