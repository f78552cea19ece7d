"""Deformable DETR R50 -> R18 distillation on Pascal VOC 07+12, 50 epochs (docs/methods.md#schedules).

20 classes in student, teacher and both criteria; VOC data (flip + short side 600, max 1000; test
on VOC2007 test, 11-point AP); 51750 iterations at total batch 16 (50 x 1035), lr 1e-4 with x0.1
after epoch 40 (iteration 41400); evaluation and checkpoints every epoch (1035 iterations).

The teacher must be a 20-class Deformable DETR R50 trained on VOC (the reference provides none):
merge it as in the COCO base, e.g. ``--input2 deformable_detr_r50_voc.pth --output
init/deformable_detr_r50_distill_r18_voc.pth``.
"""
from tprd.config import get_config

from .deformable_detr_r50_distill_r18_50ep import model, optimizer, train

NUM_CLASSES = 20
model.student.num_classes = NUM_CLASSES
model.teacher.num_classes = NUM_CLASSES

dataloader = get_config("common/data/voc_detr.py").dataloader
lr_multiplier = get_config("common/voc_schedule.py").lr_multiplier_50ep

train.init_checkpoint = "./init/deformable_detr_r50_distill_r18_voc.pth"
train.max_iter = 51750
train.eval_period = 1035
train.checkpointer = dict(period=1035, max_to_keep=5)

optimizer.lr = 1e-4

dataloader.train.total_batch_size = 16
