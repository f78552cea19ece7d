"""Deformable DETR R50, 50 epochs on COCO (detrex ``deformable_detr_r50_50ep``; docs/methods.md#schedules).

AdamW lr 2e-4 with the three groups of the reference train script, driven by the config: base lr;
backbone x0.1; ``reference_points`` / ``sampling_offsets`` x0.1; weight decay 1e-4 everywhere.
Total batch 16, 375000 iterations, lr x0.1 at 300000, gradient clipping at global L2 norm 0.1.

Backbone initialisation: set ``train.init_checkpoint`` to a torchvision ImageNet ResNet-50 file
(``resnet50-0676ba61.pth``) or detectron2's ``R-50.pkl`` (loaded into ``model.backbone``); an
official detrex Deformable DETR checkpoint loads as well (converted on the fly).
"""
from tprd.config import get_config

from .models.deformable_detr_r50 import model

dataloader = get_config("common/coco_training.py").dataloader  # batch 16, 16 workers
optimizer = get_config("common/optim.py").AdamW
lr_multiplier = get_config("common/coco_schedule.py").lr_multiplier_50ep
train = get_config("common/coco_training.py").train  # eval + checkpoints every 5000

train.output_dir = "./output/deformable_detr_r50_50ep"
train.max_iter = 375000
train.device = "cuda"
model.device = "${train.device}"

optimizer.lr = 2e-4

dataloader.evaluator.output_dir = "${train.output_dir}"
