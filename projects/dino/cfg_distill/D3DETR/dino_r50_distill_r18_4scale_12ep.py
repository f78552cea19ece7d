"""D³ETR, DINO (4-scale) R50 -> R18, COCO, 12 epochs (docs/methods.md#d3etr).

MixMatcher per decoder stage: adaptive group (soft-Hungarian matched student/teacher queries) and
fixed group (the student decodes the teacher's queries), each with prediction KD (class 1.0 / L1 5.0
/ GIoU 2.0), self-attention (10000) and cross-attention (1000) distillation; all in
``configs/common/d3detr.py``.

The reference has D³ETR on Deformable DETR only; this config uses the same weights with the
DINO hooks: the fixed group is the teacher's content embedding + its image-dependent selected
reference boxes (as KD-DETR's specific points), and the denoising queries enter no term.
"""
from tprd.config import get_config

from ..base.dino_r50_distill_r18_4scale_12ep import (  # noqa: F401
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

# the reference's D3ETR weights, the same for the three detectors
model.methods = {"d3detr": get_config("common/d3detr.py").d3detr}
train.eval_period = 5000
