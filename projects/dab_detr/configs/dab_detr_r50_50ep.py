"""DAB-DETR R50, 50 epochs on COCO (detrex ``dab_detr_r50_50ep``; docs/methods.md#schedules).

AdamW lr 1e-4 (backbone x0.1, no weight decay on norm layers), weight decay 1e-4, total batch 16,
375000 iterations with lr x0.1 at 300000, gradient clipping at global L2 norm 0.1.

Backbone initialisation: set ``train.init_checkpoint`` to a torchvision ImageNet ResNet-50 file
(e.g. ``resnet50-0676ba61.pth``) or detectron2's ``R-50.pkl``; the checkpointer loads a
backbone-only file into ``model.backbone``.
"""
from tprd.config import get_config

from .models.dab_detr_r50 import model

dataloader = get_config("common/coco_training.py").dataloader  # batch 16, 16 workers
optimizer = get_config("common/optim.py").AdamW_dab
lr_multiplier = get_config("common/coco_schedule.py").lr_multiplier_50ep
train = get_config("common/coco_training.py").train  # eval + checkpoints every 5000

train.output_dir = "./output/dab_detr_r50_50ep"
train.max_iter = 375000

optimizer.lr = 1e-4

dataloader.evaluator.output_dir = "${train.output_dir}"
