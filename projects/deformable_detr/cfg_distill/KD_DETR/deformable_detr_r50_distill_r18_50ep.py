"""KD-DETR, Deformable DETR R50 -> R18, COCO, 50 epochs (docs/methods.md#kd-detr).

Two extra query groups decoded by both models, index-aligned: 300 random general points per
iteration and the teacher's own queries (specific points); B5 losses (T = 10) at every stage.
general points: [G, 512] split into positional / content halves, 2-d references from each
model's own reference-point layer (the reference's behaviour; ``shared_general_refs=True`` hands the
teacher's references to the student).

Weights: general class 2.0 / L1 5.0 / GIoU 2.0; specific class 2.0 / L1 5.0 / GIoU 2.0
(each at all decoder stages). Reference folder: ``projects/deformable_detr/cfg_distill/KD_DETR/``.
"""
from tprd.config import LazyCall as L
from tprd.distill import KDDETR

from ..base.deformable_detr_r50_distill_r18_50ep import (  # noqa: F401
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

model.methods = {
    "kd_detr": L(KDDETR)(
        weights={
            "general_class": 2.0,
            "general_l1": 5.0,
            "general_giou": 2.0,
            "specific_class": 2.0,
            "specific_l1": 5.0,
            "specific_giou": 2.0,
        },
        general_points=300,
        temperature=10.0,
        refine=False,
        seed=0,
    ),
}
train.eval_period = 5000
