"""KD-DETR, DINO (4-scale) R50 -> R18, COCO, 12 epochs (docs/methods.md#kd-detr, #kd-detr-dino).

Two extra query groups decoded by both models, index-aligned: 900 random general points per
iteration and the teacher's own queries (specific points); B5 losses (T = 10) at every stage.
general points: [G, 256] content + [G, 4] references, both N(0,1); the references get sigma (clean,
docs/methods.md#diff-11; ``raw_general_refs=True`` passes the raw values as the reference does). The teacher
runs without denoising; the student with it (its DINO GT loss includes the dn and enc terms).
Specific points: the teacher's tgt embedding and its image-dependent selected references (docs/methods.md#kd-detr-dino).

Weights: general class 4.0 / L1 5.0 / GIoU 2.0; specific class 4.0 / L1 20.0 / GIoU 8.0
(each at all decoder stages). Reference folder: ``projects/dino/cfg_distill/KD-DETR/``.
"""
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
        seed=0,
    ),
}
train.eval_period = 5000
