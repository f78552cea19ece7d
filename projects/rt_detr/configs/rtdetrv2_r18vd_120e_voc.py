"""RT-DETRv2-S on Pascal VOC 07+12 (official ``rtdetrv2_r18vd_120e_voc.yml``): 20 classes, total
batch 32, 120 epochs of 517 iterations (16551 trainval images), the R18 recipe of
``rtdetrv2_r18vd_120e_coco.py`` (docs/rt_detr.md#training-recipe); VOC2007 test, 11-point VOC AP.
Data: the toolbox's VOC pipeline (``common/data/voc_detr.py``).
"""
from tprd.config import get_config

from .rtdetrv2_r18vd_120e_coco import lr_multiplier, model, optimizer, train  # noqa: F401

ITERS_PER_EPOCH = 517  # 16551 // 32

model.decoder.num_classes = 20

dataloader = get_config("common/data/voc_detr.py").dataloader
dataloader.train.total_batch_size = 32
train.max_iter = 120 * ITERS_PER_EPOCH
train.eval_period = 5 * ITERS_PER_EPOCH
train.checkpointer = dict(period=5 * ITERS_PER_EPOCH, max_to_keep=2)
lr_multiplier.warmup_length = 2000 / train.max_iter
