"""RT-DETRv2-L: R50vd, 6 decoder layers (official ``rtdetrv2_r50vd_6x_coco.yml``; 53.4 AP released).

Weights ``rtdetrv2_r50vd_6x_coco_ema.pth``. Recipe (``common/rtdetr_training.py``,
docs/rt_detr.md#training-recipe): AdamW lr 1e-4, backbone (not its norms) 1e-5, no weight decay on the
encoder's and decoder's norm / BN parameters, EMA 0.9999, AMP, clip 0.1, 72 epochs. Data: RT-DETRv2's
pipeline with multi-scale batches, both stopping at epoch 71 of 72 (``include/dataloader.yml``; the
defaults of ``common/rtdetr_training.py``).
"""
from tprd.config import get_config

_recipe = get_config("common/rtdetr_training.py")  # "_": not a config entry
dataloader = _recipe.dataloader
optimizer = _recipe.optimizer
train = _recipe.train

from .models.rtdetrv2_r50vd import model  # noqa: F401

EPOCHS = 72
train.max_iter = EPOCHS * 7500  # common/rtdetr_training.py: 7500 iterations per COCO epoch
lr_multiplier = _recipe.lr_multiplier
lr_multiplier.warmup_length = 2000 / train.max_iter
