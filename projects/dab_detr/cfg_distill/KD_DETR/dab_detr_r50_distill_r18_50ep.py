"""KD-DETR, DAB-DETR R50 -> R18, COCO, 50 epochs (docs/methods.md#kd-detr, #kd-detr-dab).

Two extra query groups decoded by both models, index-aligned: 300 random general points per
iteration and the teacher's own queries (specific points); B5 losses (T = 10) at every stage.
general points: [G, 4] N(0,1) anchors read as un-sigmoided boxes (the decoder sees sigma), zero
content; specific points: the teacher's learned anchor table with zero content (docs/methods.md#kd-detr-dab).

Weights: general class 1.0 / L1 5.0 / GIoU 2.0; specific class 1.0 / L1 5.0 / GIoU 2.0
(each at all decoder stages). Reference folder: ``projects/dab_detr/cfg_distill/KD-DETR/``.
"""
from tprd.config import LazyCall as L
from tprd.distill import KDDETR

from ..base.dab_detr_r50_distill_r18_50ep import (  # noqa: F401
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

model.methods = {
    "kd_detr": L(KDDETR)(
        weights={
            "general_class": 1.0,
            "general_l1": 5.0,
            "general_giou": 2.0,
            "specific_class": 1.0,
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
