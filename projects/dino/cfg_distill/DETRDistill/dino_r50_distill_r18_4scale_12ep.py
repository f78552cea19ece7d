"""DETRDistill, DINO (4-scale) R50 -> R18, COCO, 12 epochs (METHODS.md 3.1).

Per decoder stage: soft-Hungarian matched prediction KD (class 1.0 / L1 5.0 / GIoU 2.0, / (B*N)),
target-aware neck-feature distillation (2.0, top-100 teacher entries per image) and query prior
assignment (the student decodes the teacher's queries with the teacher's GT matching as targets:
class 1.0 / L1 5.0 / GIoU 2.0).

The reference has DETRDistill for Deformable DETR only; this config uses the same weights with
the DINO (4-scale) hooks (4 neck levels, post-norm decoder states).
"""
from tprd.config import LazyCall as L
from tprd.distill import DETRDistill
from tprd.modeling.matcher import HungarianMatcher

from ..base.dino_r50_distill_r18_4scale_12ep import (  # noqa: F401
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

model.methods = {
    "detrdistill": L(DETRDistill)(
        weights={
            "class": 1.0,
            "l1": 5.0,
            "giou": 2.0,
            "target_aware": 2.0,
            "prior_class": 1.0,
            "prior_l1": 5.0,
            "prior_giou": 2.0,
        },
        refine=False,
        topk=100,
        matcher=L(HungarianMatcher)(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, alpha=0.25, gamma=2.0),
        soft_costs=[1.0, 5.0, 2.0],
    ),
}

train.output_dir = "./output/dino/DETRDistill/dino_r50_distill_r18_4scale_12ep"
train.eval_period = 5000
