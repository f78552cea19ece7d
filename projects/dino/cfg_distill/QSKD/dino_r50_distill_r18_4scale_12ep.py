"""QSKD, DINO (4-scale) R50 -> R18, COCO, 12 epochs (docs/methods.md#qskd).

Per decoder stage: GIoU-based group query selection, positive pairs by shared GT and hard-negative
pairs by soft matching, pair-averaged prediction distillation (class 1.0 / L1 5.0 / GIoU 2.0) and
attention-guided memory distillation (100) with the teacher's per-query cross-attention maps of the
same layer (all in ``configs/common/qskd.py``).

The reference has QSKD for Deformable DETR only; DINO's teacher queries are its content embedding
plus its selected proposals, no denoising query enters any term. Same weights.
"""
from tprd.config import get_config

from ..base.dino_r50_distill_r18_4scale_12ep import (  # noqa: F401
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

# the reference's QSKD weights and matchers, the same for the three detectors
model.methods = {"qskd": get_config("common/qskd.py").qskd}
train.eval_period = 5000
