"""DINO-4scale R50 -> R18 distillation on COCO, 12 epochs: everything except the method.

The method configs (``../<Method>[_TPRD]/dino_r50_distill_r18_4scale_12ep.py``) import this file and
set ``model.methods``. The teacher is frozen, kept in eval mode and run without denoising queries;
the student trains with denoising (its GT loss has the dn and enc terms). DINO has dropout 0, so
``model.teacher_train_mode`` makes no difference here.

Initial weights (docs/methods.md#initial-weights)::

    python merge_weight.py --input1 resnet18-f37072fd.pth \
        --input2 dino_r50_4scale_12ep_49_2AP.pth --output init/dino_r50_distill_r18.pth

Schedule (docs/methods.md#schedules, #kd-detr-dino): AdamW lr 2e-4 with backbone and sampling_offsets at 2e-5 (the
values the reference's DINO script hard-codes; here they come from the config), weight decay 1e-4,
total batch 16, 90000 iterations, lr x0.1 at 82500, gradient clipping 0.1.
"""
from tprd.config import LazyCall as L
from tprd.config import get_config
from tprd.distill import Distiller

from ...configs.models.dino_r18 import model as student
from ...configs.models.dino_r50 import model as teacher

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
lr_multiplier = get_config("common/coco_schedule.py").lr_multiplier_12ep
train = get_config("common/coco_training.py").train  # eval + checkpoints every 5000

train.init_checkpoint = "./init/dino_r50_distill_r18.pth"
train.max_iter = 90000
train.checkpointer.max_to_keep = 1

optimizer.lr = 2e-4
