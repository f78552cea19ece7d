"""FGD, DAB-DETR R50 -> R18, COCO, 50 epochs (docs/methods.md#fgd).

FGD: per neck level spatial/channel attention, foreground/background masks from the GT
boxes, attention imitation and global relation (trainable context blocks for both sides);
weight 0.05 with inner alpha 0.001, beta 0.0005, gamma 0.001, lambda 0.000005, T 0.5.
DAB-DETR has one neck level, its input projection of res5; the teacher runs only to it (docs/methods.md#diff-14).
Not in the reference (its feature methods are Deformable DETR only).
All settings in ``configs/common/feature_kd.py``.
"""
from tprd.config import get_config

from ..base.dab_detr_r50_distill_r18_50ep import (  # noqa: F401
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

model.methods = {"fgd": get_config("common/feature_kd.py").fgd}
