"""The CPU smoke setting of the distillation configs ``projects/<det>/cfg_distill/base/*_synthetic.py``.

Synthetic shapes (``common/data/synthetic_detr.py``) at batch 2; 20 iterations on the CPU, lr x0.1
after 16, no warmup; no initial weights, no evaluation during training, a log line every 5
iterations and one checkpoint at the end. The synthetic bases take ``dataloader``, ``train`` and
``lr_multiplier`` from here, model and optimiser from their COCO base (``train.output_dir`` follows from the config's
path).
"""
from fvcore.common.param_scheduler import MultiStepParamScheduler

from tprd.config import LazyCall as L
from tprd.config import get_config
from tprd.engine.lr_scheduler import WarmupParamScheduler

dataloader = get_config("common/data/synthetic_detr.py").dataloader
dataloader.train.total_batch_size = 2
dataloader.evaluator.output_dir = "${train.output_dir}"  # coco_instances_results.json, as detector runs

lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(values=[1.0, 0.1], milestones=[16, 20]),
    warmup_length=0.0,
    warmup_factor=1.0,
)

train = get_config("common/train.py").train
train.init_checkpoint = ""  # a trained teacher: merge_weight.py output (docs/workflow.md, CPU walkthrough)
train.allow_random_teacher = True  # a pipeline check runs without one, warning that the teacher is random
train.device = "cpu"
train.max_iter = 20
train.eval_period = 0
train.log_period = 5
train.checkpointer = dict(period=20, max_to_keep=1)
