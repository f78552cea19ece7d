"""COCO training at total batch 16: data and training loop of the detectors' COCO configs
(``projects/<det>/configs/*_r50_*.py``) and of the COCO distillation bases (``cfg_distill/base/``).

``common/data/coco_detr.py`` at total batch 16 with 16 loader workers; ``common/train.py`` with
evaluation and checkpoints every 5000 iterations (keeping the last 5). Each config adds its
optimiser, lr, schedule and ``train.max_iter`` (``train.output_dir`` follows from the config's
path unless set).
"""
from tprd.config import get_config

dataloader = get_config("common/data/coco_detr.py").dataloader
dataloader.train.total_batch_size = 16
dataloader.train.num_workers = 16

train = get_config("common/train.py").train
train.eval_period = 5000
train.checkpointer = dict(period=5000, max_to_keep=5)
