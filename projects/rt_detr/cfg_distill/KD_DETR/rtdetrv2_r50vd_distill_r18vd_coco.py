"""KD-DETR, RT-DETRv2-L (R50vd) -> RT-DETRv2-S (R18vd), COCO (docs/methods.md#kd-detr)."""
from tprd.config import LazyCall as L
from tprd.distill import KDDETR

from ..base.rtdetrv2_r50vd_distill_r18vd_coco import (  # noqa: F401
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

# RT-DETR decodes content + box queries like DINO (query_kind "content_box"), so KD-DETR takes
# DINO's settings (docs/methods.md#kd-detr-dino, docs/rt_detr.md#distillation): the specific points are the
# teacher's selected encoder features and boxes (detached)
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
