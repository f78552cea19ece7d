"""DINO-4scale R50 -> R18 distillation on Pascal VOC 07+12, 12 epochs.

Not in the reference (its VOC runs are Deformable DETR only): the VOC data of docs/methods.md#schedules with
DINO's 12-epoch schedule, i.e. 12420 iterations at total batch 16 (12 x 1035), lr x0.1 after epoch
11 (iteration 11385), evaluation and checkpoints every epoch. 20 classes everywhere; the teacher
must be a 20-class DINO R50 trained on VOC.
"""
from fvcore.common.param_scheduler import MultiStepParamScheduler

from tprd.config import LazyCall as L
from tprd.config import get_config
from tprd.engine.lr_scheduler import WarmupParamScheduler

from .dino_r50_distill_r18_4scale_12ep import model, optimizer, train

NUM_CLASSES = 20
ITERS_PER_EPOCH = 1035
model.student.num_classes = NUM_CLASSES
model.teacher.num_classes = NUM_CLASSES

dataloader = get_config("common/data/voc_detr.py").dataloader
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(
        values=[1.0, 0.1],
        milestones=[11 * ITERS_PER_EPOCH, 12 * ITERS_PER_EPOCH],
    ),
    warmup_length=0.0,
    warmup_method="linear",
    warmup_factor=0.001,
)

train.init_checkpoint = "./init/dino_r50_distill_r18_voc.pth"
train.max_iter = 12 * ITERS_PER_EPOCH
train.eval_period = ITERS_PER_EPOCH
train.checkpointer = dict(period=ITERS_PER_EPOCH, max_to_keep=1)

optimizer.lr = 1e-4

dataloader.train.total_batch_size = 16
