"""RT-DETRv2-M: R50vd, CSP expansion 0.5, 6 decoder layers of which inference uses the third
(``eval_idx=2``; official ``rtdetrv2_r50vd_m_7x_coco.yml``).

Weights ``rtdetrv2_r50vd_m_7x_coco_ema.pth``. Recipe as ``rtdetrv2_r50vd_6x_coco.py`` over 84 epochs
(docs/rt_detr.md#training-recipe). Data: RT-DETRv2's pipeline with multi-scale batches; the heavy ops
and the multi-scale sizes stop at epoch 81 of 84 (the yml's ``policy.epoch`` and ``collate_fn.stop_epoch``).
"""
from tprd.config import get_config

_recipe = get_config("common/rtdetr_training.py")  # "_": not a config entry
dataloader = _recipe.dataloader
optimizer = _recipe.optimizer
train = _recipe.train

from .models.rtdetrv2_r50vd import model

model.encoder.expansion = 0.5
model.decoder.eval_idx = 2

EPOCHS = 84
train.max_iter = EPOCHS * 7500  # common/rtdetr_training.py: 7500 iterations per COCO epoch
STOP_EPOCH = 81  # yml: transforms.policy.epoch and collate_fn.stop_epoch
dataloader.train.mapper.stop_iter = STOP_EPOCH * 7500
dataloader.train.batch_transform.stop_iter = STOP_EPOCH * 7500
lr_multiplier = _recipe.lr_multiplier
lr_multiplier.warmup_length = 2000 / train.max_iter
