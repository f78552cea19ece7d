"""DINO-4scale R50, 12 epochs on COCO (detrex ``dino_r50_4scale_12ep``; docs/methods.md#schedules, #diff-21).

The effective optimiser of the reference DINO train script, driven by the config: AdamW lr 2e-4,
backbone and ``sampling_offsets`` / ``reference_points`` x0.1 (2e-5), weight decay 1e-4; total
batch 16, 90000 iterations with lr x0.1 at 82500; gradient clipping at global L2 norm 0.1.

Backbone initialisation: set ``train.init_checkpoint`` to a torchvision ImageNet ResNet-50 file or
detectron2's ``R-50.pkl`` (loaded into ``model.backbone``); the official detrex checkpoint
``dino_r50_4scale_12ep_49_2AP.pth`` loads too (converted on the fly), e.g. with ``--eval-only``.
"""
from tprd.config import get_config

from .models.dino_r50 import model

dataloader = get_config("common/coco_training.py").dataloader  # batch 16, 16 workers
optimizer = get_config("common/optim.py").AdamW
lr_multiplier = get_config("common/coco_schedule.py").lr_multiplier_12ep
train = get_config("common/coco_training.py").train  # eval + checkpoints every 5000

train.output_dir = "./output/dino_r50_4scale_12ep"
train.max_iter = 90000
train.device = "cuda"
model.device = "${train.device}"

optimizer.lr = 2e-4

dataloader.evaluator.output_dir = "${train.output_dir}"
