"""RT-DETRv2-L (R50vd, 6 decoder layers) -> RT-DETRv2-S (R18vd, 3 decoder layers) distillation on COCO:
everything except the method.

The method configs (``../<Method>[_TPRD]/rtdetrv2_r50vd_distill_r18vd_coco.py``) import this file and
set ``model.methods``. The teacher is frozen, kept in eval mode, runs all 6 decoder layers (the
distiller asks it to, whatever its ``eval_idx``) and decodes no denoising queries; the student trains
with denoising (its GT loss has the ``_dn_*`` and ``_enc_0`` terms). Stages pair uniformly, final with
final: student stage ``l`` learns from teacher stage ``2l+1`` (1, 3, 5), and TPRD refines a teacher
stage from every earlier teacher stage (docs/methods.md#stage-pairing). The feature-level methods
distil the hybrid encoder's three 256-channel maps (the ``neck``).

Initial weights (docs/rt_detr.md#initial-weights): the student backbone from the ImageNet
PResNet-18vd weights the reference uses, the teacher from the official RT-DETRv2-L checkpoint (its
EMA weights)::

    python merge_weight.py --input1 ResNet18_vd_pretrained_from_paddle.pth \\
        --input2 rtdetrv2_r50vd_6x_coco_ema.pth --output init/rtdetrv2_r50vd_distill_r18vd.pth

Schedule: the student's own recipe (``../../configs/rtdetrv2_r18vd_120e_coco.py``,
docs/rt_detr.md#training-recipe): AdamW lr 1e-4 for every student parameter, no weight decay on
norms, 2000 warmup iterations, EMA 0.9999, AMP, gradient clipping 0.1, total batch 16, 120 epochs.
"""
from tprd.config import LazyCall as L
from tprd.distill import Distiller

from ...configs.models.rtdetrv2_r18vd import model as student
from ...configs.models.rtdetrv2_r50vd import model as teacher
from ...configs.rtdetrv2_r18vd_120e_coco import dataloader, lr_multiplier, optimizer, train  # noqa: F401

model = L(Distiller)(
    student=student,
    teacher=teacher,
    methods={},
    teacher_train_mode=False,
    stage_pairing="uniform",  # teacher stages [1, 3, 5] for the student's [0, 1, 2]
)
del student, teacher

train.init_checkpoint = "./init/rtdetrv2_r50vd_distill_r18vd.pth"
train.checkpointer.max_to_keep = 1
