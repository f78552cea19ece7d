"""RT-DETRv2-S: R18vd, 3 decoder layers (official ``rtdetrv2_r18vd_120e_coco.yml``; 48.1 AP released).

Official weights load with ``tprd.checkpoint.load_rtdetr_checkpoint``
(``rtdetrv2_r18vd_120e_coco_rerun_48.1.pth``). Training recipe (``common/rtdetr_training.py``,
docs/rt_detr.md#training-recipe): AdamW lr 1e-4 for every parameter (the R18 yml has no backbone
group), no weight decay on norm / BN parameters, 2000 warmup iterations, EMA 0.9999, AMP, clip 0.1,
120 epochs. The backbone starts from the ImageNet PResNet-18vd weights (docs/rt_detr.md#initial-weights).
Data: RT-DETRv2's pipeline (``common/rtdetr_training.py``) with the S settings of the yml: the
photometric / zoom-out / IoU-crop ops stop at epoch 117 of 120, and no multi-scale batches.
"""
from tprd.config import get_config

_recipe = get_config("common/rtdetr_training.py")  # "_": not a config entry
dataloader = _recipe.dataloader
optimizer = _recipe.optimizer
train = _recipe.train

from .models.rtdetrv2_r18vd import model  # noqa: F401

optimizer = get_config("common/rtdetr_optim.py").AdamW_r18
EPOCHS = 120
train.max_iter = EPOCHS * 7500  # common/rtdetr_training.py: 7500 iterations per COCO epoch
STOP_EPOCH = 117  # yml: transforms.policy.epoch 117
dataloader.train.mapper.stop_iter = STOP_EPOCH * 7500
dataloader.train.batch_transform = None  # yml: collate_fn.scales ~ (every batch at 640x640)
lr_multiplier = _recipe.lr_multiplier
lr_multiplier.warmup_length = 2000 / train.max_iter
