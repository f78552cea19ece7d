"""D³ETR, DAB-DETR R50 -> R18, COCO, 50 epochs (docs/methods.md#d3etr).

MixMatcher per decoder stage: adaptive group (soft-Hungarian matched student/teacher queries) and
fixed group (the student decodes the teacher's queries), each with prediction KD (class 1.0 / L1 5.0
/ GIoU 2.0), self-attention (10000) and cross-attention (1000) distillation; all in
``configs/common/d3detr.py``.

The reference has D³ETR on Deformable DETR only; this config uses the same weights with the
DAB-DETR hooks: the teacher's anchors as the fixed group, and its dense decoder cross-attention
(softmax over the memory tokens of its single level) summed per head over the queries.
"""
from tprd.config import get_config

from ..base.dab_detr_r50_distill_r18_50ep import (  # noqa: F401
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

# the reference's D3ETR weights, the same for the three detectors
model.methods = {"d3detr": get_config("common/d3detr.py").d3detr}
train.eval_period = 5000
