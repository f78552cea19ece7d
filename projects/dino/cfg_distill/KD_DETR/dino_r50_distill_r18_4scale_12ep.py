"""KD-DETR, DINO (4-scale) R50 -> R18, COCO, 12 epochs (docs/methods.md#kd-detr, #kd-detr-dino)."""
from tprd.config import LazyCall as L
from tprd.distill import KDDETR

from ..base.dino_r50_distill_r18_4scale_12ep import (  # noqa: F401
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

model.methods = {
    "kd_detr": L(KDDETR)(
        weights={
            "general_class": 4.0,
            "general_l1": 5.0,
            "general_giou": 2.0,
            "specific_class": 4.0,
            "specific_l1": 20.0,
            "specific_giou": 8.0,
        },
        general_points=900,
        temperature=10.0,
        refine=False,
        class_kd="decoupled",  # class KD with refine: decoupled (TPRD-CKD), sigmoid, decoupled+bce
        seed=0,
    ),
}
train.eval_period = 5000
