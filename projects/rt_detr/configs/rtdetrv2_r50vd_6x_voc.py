"""RT-DETRv2-L on Pascal VOC 07+12: the 20-class teacher of the VOC distillation configs
(``cfg_distill/*/rtdetrv2_r50vd_distill_r18vd_voc.py``). Not an official configuration: the L
recipe (``rtdetrv2_r50vd_6x_coco.py``) on the VOC data and schedule of ``rtdetrv2_r18vd_120e_voc.py``
(total batch 32, 120 epochs). Start it from the COCO checkpoint with fresh class heads:
``train.init_checkpoint=rtdetrv2_r50vd_6x_coco_ema.pth train.init_skip_class_heads=True``.
"""
from .rtdetrv2_r18vd_120e_voc import dataloader, lr_multiplier, train  # noqa: F401
from .rtdetrv2_r50vd_6x_coco import model, optimizer  # noqa: F401

model.decoder.num_classes = 20
