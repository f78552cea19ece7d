"""DETRDistill, DAB-DETR R50 -> R18, COCO, 50 epochs (docs/methods.md#detrdistill).

Per decoder stage: soft-Hungarian matched prediction KD, target-aware neck-feature distillation and
query prior assignment, with the reference's weights (class 1.0 / L1 5.0 / GIoU 2.0, target-aware
2.0; all in ``configs/common/detrdistill.py``).

The reference has DETRDistill for Deformable DETR only; this config uses the same weights with
the DAB-DETR hooks (the single input projection as neck).
"""
from tprd.config import get_config

from ..base.dab_detr_r50_distill_r18_50ep import (  # noqa: F401
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

# the reference's DETRDistill weights and matcher, the same for the three detectors
model.methods = {"detrdistill": get_config("common/detrdistill.py").detrdistill}
train.eval_period = 5000
