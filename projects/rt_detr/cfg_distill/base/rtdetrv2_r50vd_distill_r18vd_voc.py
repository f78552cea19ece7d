"""RT-DETRv2-L -> RT-DETRv2-S distillation on Pascal VOC 07+12: the student's VOC recipe
(``../../configs/rtdetrv2_r18vd_120e_voc.py``: total batch 32, 120 epochs of 517 iterations). 20
classes everywhere; the teacher must be a 20-class RT-DETRv2-L trained on VOC
(``../../configs/rtdetrv2_r50vd_6x_voc.py``), merged with ``merge_weight.py`` as on COCO.
"""
from ...configs.rtdetrv2_r18vd_120e_voc import dataloader, lr_multiplier, optimizer, train  # noqa: F401
from .rtdetrv2_r50vd_distill_r18vd_coco import model

NUM_CLASSES = 20
model.student.decoder.num_classes = NUM_CLASSES
model.teacher.decoder.num_classes = NUM_CLASSES

train.init_checkpoint = "./init/rtdetrv2_r50vd_distill_r18vd_voc.pth"
train.checkpointer.max_to_keep = 1
