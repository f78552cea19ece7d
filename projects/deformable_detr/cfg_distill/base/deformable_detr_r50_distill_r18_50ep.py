"""Deformable DETR R50 -> R18 distillation on COCO, 50 epochs: everything except the method.

The method configs (``../<Method>[_TPRD]/deformable_detr_r50_distill_r18_50ep.py``) import this file
and set ``model.methods``. Teacher and student are the plain detector configs; the teacher is
frozen and kept in eval mode by the Distiller (``model.teacher_train_mode=True`` restores the
reference's train-mode teacher, i.e. dropout 0.1 active).

Initial weights (docs/methods.md#initial-weights): merge an ImageNet ResNet-18 and the official detrex Deformable
DETR R50 checkpoint once, then point ``train.init_checkpoint`` at the result::

    python merge_weight.py --input1 resnet18-f37072fd.pth \
        --input2 deformable_detr_r50_50ep.pth --output init/deformable_detr_r50_distill_r18.pth

Schedule (docs/methods.md#schedules): AdamW lr 2e-4 (backbone, reference_points, sampling_offsets x0.1),
weight decay 1e-4, total batch 16, 375000 iterations, lr x0.1 at 300000, gradient clipping 0.1.
"""
from tprd.config import LazyCall as L
from tprd.config import get_config
from tprd.distill import Distiller

from ...configs.models.deformable_detr_r18 import model as student
from ...configs.models.deformable_detr_r50 import model as teacher

# the whole Distiller is moved to train.device by the trainer
student.device = None
teacher.device = None

model = L(Distiller)(
    student=student,
    teacher=teacher,
    methods={},
    teacher_train_mode=False,
)
del student, teacher

dataloader = get_config("common/coco_training.py").dataloader  # batch 16, 16 workers
dataloader.evaluator.output_dir = "${train.output_dir}"  # coco_instances_results.json, as detector runs
optimizer = get_config("common/optim.py").AdamW
lr_multiplier = get_config("common/coco_schedule.py").lr_multiplier_50ep
train = get_config("common/coco_training.py").train  # eval + checkpoints every 5000

train.init_checkpoint = "./init/deformable_detr_r50_distill_r18.pth"
train.max_iter = 375000

optimizer.lr = 2e-4
