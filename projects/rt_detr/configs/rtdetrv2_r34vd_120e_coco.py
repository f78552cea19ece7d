"""RT-DETRv2-M*: R34vd, 4 decoder layers (official ``rtdetrv2_r34vd_120e_coco.yml``).

Weights ``rtdetrv2_r34vd_120e_coco_ema.pth``. Recipe as ``rtdetrv2_r18vd_120e_coco.py`` (one lr for
every parameter, no weight decay on norms, 120 epochs; docs/rt_detr.md#training-recipe). Data:
RT-DETRv2's pipeline with multi-scale batches; the heavy ops and the multi-scale sizes stop at
epoch 117 of 120 (the yml's ``policy.epoch`` and ``collate_fn.stop_epoch``).
"""
from tprd.config import get_config

_recipe = get_config("common/rtdetr_training.py")  # "_": not a config entry
dataloader = _recipe.dataloader
optimizer = _recipe.optimizer
train = _recipe.train

from .models.rtdetrv2_r18vd import model

model.backbone.depth = 34
model.decoder.num_layers = 4

optimizer = get_config("common/rtdetr_optim.py").AdamW_r18
EPOCHS = 120
train.max_iter = EPOCHS * 7500  # common/rtdetr_training.py: 7500 iterations per COCO epoch
STOP_EPOCH = 117  # yml: transforms.policy.epoch and collate_fn.stop_epoch
dataloader.train.mapper.stop_iter = STOP_EPOCH * 7500
dataloader.train.batch_transform.stop_iter = STOP_EPOCH * 7500
lr_multiplier = _recipe.lr_multiplier
lr_multiplier.warmup_length = 2000 / train.max_iter
