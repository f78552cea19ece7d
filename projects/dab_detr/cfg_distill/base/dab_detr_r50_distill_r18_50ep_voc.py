"""DAB-DETR R50 -> R18 distillation on Pascal VOC 07+12, 50 epochs.

Not in the reference (its VOC runs are Deformable DETR only); the same VOC setting as the Deformable
DETR configs (docs/methods.md#schedules): 20 classes everywhere, 51750 iterations at total batch 16, lr 1e-4
with x0.1 at iteration 41400, evaluation and checkpoints every 1035 iterations. The teacher must be
a 20-class DAB-DETR R50 trained on VOC.
"""
from tprd.config import get_config

from .dab_detr_r50_distill_r18_50ep import model, optimizer, train

NUM_CLASSES = 20
for detector in (model.student, model.teacher):
    detector.num_classes = NUM_CLASSES
del detector

dataloader = get_config("common/data/voc_detr.py").dataloader
lr_multiplier = get_config("common/voc_schedule.py").lr_multiplier_50ep

train.init_checkpoint = "./init/dab_detr_r50_distill_r18_voc.pth"
train.max_iter = 51750
train.eval_period = 1035
train.checkpointer = dict(period=1035, max_to_keep=5)

optimizer.lr = 1e-4

dataloader.train.total_batch_size = 16
