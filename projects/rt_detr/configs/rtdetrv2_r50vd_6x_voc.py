"""RT-DETRv2-L on Pascal VOC 07+12: the 20-class teacher of the VOC distillation configs
(``cfg_distill/*/rtdetrv2_r50vd_distill_r18vd_voc.py``). Not an official configuration: the L
recipe (``rtdetrv2_r50vd_6x_coco.py``) on the VOC data and schedule of ``rtdetrv2_r18vd_120e_voc.py``
(total batch 32, 120 epochs). Start it from the COCO checkpoint with fresh class heads:
``train.init_checkpoint=rtdetrv2_r50vd_6x_coco_ema.pth train.init_skip_class_heads=True``.
Data: that of ``rtdetrv2_r18vd_120e_voc.py`` plus the L recipe's multi-scale batches, which stop with
the other ops at epoch 117 of 120 (as in the official 120-epoch ymls that have multi-scale, R34vd).
"""
from .rtdetrv2_r18vd_120e_voc import ITERS_PER_EPOCH, STOP_EPOCH, dataloader, lr_multiplier, train  # noqa: F401
from .rtdetrv2_r50vd_6x_coco import dataloader as _l_data  # "_": not a config entry
from .rtdetrv2_r50vd_6x_coco import model, optimizer  # noqa: F401

dataloader.train.batch_transform = _l_data.train.batch_transform
dataloader.train.batch_transform.stop_iter = STOP_EPOCH * ITERS_PER_EPOCH

model.decoder.num_classes = 20
