"""CrossKD, DAB-DETR R50 -> R18, COCO, 50 epochs (docs/methods.md#crosskd).

The student's encoder memory goes through the frozen teacher's queries, decoder and heads (with
gradients into the student's encoder, neck and backbone); per decoder stage the crossed predictions
are soft-Hungarian matched to the teacher's own and distilled (class 1.0 / L1 5.0 / GIoU 2.0, all in
``configs/common/crosskd.py``).

The reference has CrossKD for Deformable DETR only; here the teacher's post-encoder path is its
anchor table and conditional decoder over the student's single-level memory (with the memory's
position embedding and mask). Same weights.
"""
from tprd.config import get_config

from ..base.dab_detr_r50_distill_r18_50ep import (  # noqa: F401
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

# the reference's CrossKD weights and matchers, the same for the three detectors
model.methods = {"crosskd": get_config("common/crosskd.py").crosskd}
train.eval_period = 5000
