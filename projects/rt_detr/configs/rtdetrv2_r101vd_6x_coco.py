"""RT-DETRv2-X: R101vd, hybrid encoder of width 384 (FFN 2048), 6 decoder layers of width 256
(official ``rtdetrv2_r101vd_6x_coco.yml``).

Weights ``rtdetrv2_r101vd_6x_coco_from_paddle.pth`` (nested as ``{"ema": {"module": ...}}``). Recipe as
``rtdetrv2_r50vd_6x_coco.py`` (docs/rt_detr.md#training-recipe), its data pipeline included
(multi-scale batches; both stop at epoch 71 of 72).
"""
from tprd.config import get_config

_recipe = get_config("common/rtdetr_training.py")  # "_": not a config entry
dataloader = _recipe.dataloader
optimizer = _recipe.optimizer
train = _recipe.train

from .models.rtdetrv2_r50vd import model

model.backbone.depth = 101
model.encoder.hidden_dim = 384
model.encoder.dim_feedforward = 2048
model.decoder.feat_channels = [384, 384, 384]

EPOCHS = 72
train.max_iter = EPOCHS * 7500  # common/rtdetr_training.py: 7500 iterations per COCO epoch
lr_multiplier = _recipe.lr_multiplier
lr_multiplier.warmup_length = 2000 / train.max_iter
