"""The tiny CPU training setup of the detector configs ``projects/<det>/configs/*_r18_synthetic.py``.

Synthetic shapes (``common/data/synthetic_detr.py``) at batch 4; 600 iterations on the CPU, lr x0.1
after 500, a 5% warmup from x0.1; evaluated once, at the end, writing coco_instances_results.json to
the output folder; checkpoints every 200 iterations (keep 2). AdamW lr 4e-4 with one lr for every
parameter: there is no pretrained backbone, so no backbone (or sampling-offset) lr reduction --
measured on the Deformable DETR config (600 iterations): AP 1.1 with the COCO lr factors, AP 3.6
with one lr for everything. The detector configs take ``dataloader``, ``optimizer``, ``train`` and
``lr_multiplier`` from here, shrink their model and set ``train.output_dir``.
"""
from fvcore.common.param_scheduler import MultiStepParamScheduler

from tprd.config import LazyCall as L
from tprd.config import get_config
from tprd.engine.lr_scheduler import WarmupParamScheduler

dataloader = get_config("common/data/synthetic_detr.py").dataloader
dataloader.train.total_batch_size = 4
dataloader.evaluator.output_dir = "${train.output_dir}"  # coco_instances_results.json

optimizer = get_config("common/optim.py").AdamW
optimizer.lr = 4e-4
optimizer.params.lr_factor_func = None

train = get_config("common/train.py").train
train.device = "cpu"
train.max_iter = 600
train.eval_period = 0  # evaluate once, at the end
train.log_period = 20
train.checkpointer = dict(period=200, max_to_keep=2)

lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(values=[1.0, 0.1], milestones=[500, 600]),
    warmup_length=0.05,
    warmup_factor=0.1,
)
