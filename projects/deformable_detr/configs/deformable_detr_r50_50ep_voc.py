"""Deformable DETR R50 on Pascal VOC 07+12 (docs/methods.md#schedules): 20 classes, 50 epochs of 1035
iterations (51750), lr 1e-4 x0.1 after epoch 40, eval and checkpoint every epoch (keep 5),
VOC 2007 test with the 11-point VOC evaluator."""
from tprd.config import get_config

from .deformable_detr_r50_50ep import model, optimizer, train

dataloader = get_config("common/data/voc_detr.py").dataloader
lr_multiplier = get_config("common/voc_schedule.py").lr_multiplier_50ep

model.num_classes = 20
train.output_dir = "./output/deformable_detr_r50_50ep_voc"
train.max_iter = 51750
train.eval_period = 1035
train.checkpointer = dict(period=1035, max_to_keep=5)
optimizer.lr = 1e-4
dataloader.train.total_batch_size = 16
