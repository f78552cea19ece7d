"""DAB-DETR R50 on the synthetic shapes: the teacher of the synthetic distillation configs.

The model is exactly ``model.teacher`` of ``cfg_distill/base/dab_detr_r50_distill_r18_synthetic.py`` (5 classes, 30
queries, its small transformer, ResNet-50 with trainable BatchNorm, trained from scratch), trained
alone with the CPU setting of the detector configs (``common/synthetic_cpu.py``: batch 4, 600
iterations, AdamW 4e-4, one evaluation at the end). Its ``model_final.pth`` is ``--input2`` of
``merge_weight.py``; the merged file is ``train.init_checkpoint`` of every
``cfg_distill/<Method>/*_synthetic.py`` (docs/workflow.md, "CPU walkthrough")::

    python projects/dab_detr/train_net.py \\
        --config-file projects/dab_detr/configs/dab_detr_r50_synthetic.py \\
        train.output_dir=./output/dab_detr_teacher_synthetic
"""
from tprd.config import get_config

from ..cfg_distill.base.dab_detr_r50_distill_r18_synthetic import model as _distill

_cpu = get_config("common/synthetic_cpu.py")  # "_": not a config entry
dataloader = _cpu.dataloader
optimizer = _cpu.optimizer
train = _cpu.train
lr_multiplier = _cpu.lr_multiplier

model = _distill.teacher
train.output_dir = "./output/dab_detr_r50_synthetic"
