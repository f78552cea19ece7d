"""KD-DETR, DAB-DETR R50 -> R18, COCO, 50 epochs (docs/methods.md#kd-detr, #kd-detr-dab)."""
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
        class_kd="decoupled",  # class KD with refine: decoupled (TPRD-CKD), sigmoid, decoupled+bce
        seed=0,
    ),
}
train.eval_period = 5000
