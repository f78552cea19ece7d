"""RT-DETRv2-S on Pascal VOC 07+12 (official ``rtdetrv2_r18vd_120e_voc.yml``): 20 classes, total
batch 32, 120 epochs of 517 iterations (16551 trainval images), the R18 recipe of
``rtdetrv2_r18vd_120e_coco.py`` (docs/rt_detr.md#training-recipe); VOC2007 test, 11-point VOC AP.
Data: the VOC datasets of ``common/data/voc_detr.py`` through RT-DETRv2's pipeline as in the yml
(the mappers of ``rtdetrv2_r18vd_120e_coco.py``): the photometric / zoom-out / IoU-crop ops stop at epoch 117 of
120, no multi-scale batches, 640x640 at test time.
"""
from tprd.config import get_config

from .rtdetrv2_r18vd_120e_coco import dataloader as _rtdetr_data  # "_": not a config entry
from .rtdetrv2_r18vd_120e_coco import lr_multiplier, model, optimizer, train  # noqa: F401

ITERS_PER_EPOCH = 517  # 16551 // 32

model.decoder.num_classes = 20

dataloader = get_config("common/data/voc_detr.py").dataloader
dataloader.train.total_batch_size = 32
STOP_EPOCH = 117  # yml: transforms.policy.epoch 117 (collate_fn.scales ~)
dataloader.train.mapper = _rtdetr_data.train.mapper
dataloader.train.mapper.stop_iter = STOP_EPOCH * ITERS_PER_EPOCH
dataloader.train.aspect_ratio_grouping = False  # every image becomes 640x640
dataloader.test.mapper = _rtdetr_data.test.mapper
train.max_iter = 120 * ITERS_PER_EPOCH
train.eval_period = 5 * ITERS_PER_EPOCH
train.checkpointer = dict(period=5 * ITERS_PER_EPOCH, max_to_keep=2)
lr_multiplier.warmup_length = 2000 / train.max_iter
