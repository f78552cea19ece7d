"""RT-DETRv2 R50vd on the synthetic shapes: the teacher of the synthetic distillation configs.

The model is exactly ``model.teacher`` of ``cfg_distill/base/rtdetrv2_r50vd_distill_r18vd_synthetic.py``
(5 classes, 30 queries, width 128, 6 decoder layers, trainable BatchNorm, trained from scratch),
trained alone with the CPU setting of the detector configs (``common/synthetic_cpu.py``). Its
``model_final.pth`` is ``--input2`` of ``merge_weight.py``; the merged file is
``train.init_checkpoint`` of every ``cfg_distill/<Method>/*_synthetic.py``::

    python projects/rt_detr/train_net.py \\
        --config-file projects/rt_detr/configs/rtdetrv2_r50vd_synthetic.py \\
        train.output_dir=./output/rtdetr_teacher_synthetic
"""
from tprd.config import get_config

from ..cfg_distill.base.rtdetrv2_r50vd_distill_r18vd_synthetic import model as _distill

# Data: the DETR mapper, not RT-DETRv2's pipeline, for the reasons in rtdetrv2_r18vd_synthetic.py
_cpu = get_config("common/synthetic_cpu.py")  # "_": not a config entry
dataloader = _cpu.dataloader
optimizer = _cpu.optimizer
train = _cpu.train
lr_multiplier = _cpu.lr_multiplier

model = _distill.teacher
model.device = "${train.device}"
train.output_dir = "./output/rtdetrv2_r50vd_synthetic"
