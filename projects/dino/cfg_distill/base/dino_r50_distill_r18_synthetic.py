"""DINO-4scale R50 -> R18 distillation on the synthetic shapes, small enough for a CPU.

A smoke / tutorial setting, not a benchmark: 5 classes, 30 queries (10 denoising queries per kind),
1 encoder + 2 decoder layers with FFN 128 in both models, batch 2, 20 iterations, no pretrained
weights (the teacher is random unless train.init_checkpoint is a merge_weight.py file of
the trained synthetic teacher). The width stays 256: DINO's query positions use a fixed
128-per-coordinate sine embedding of the boxes (as detrex). The method configs' ``..._synthetic.py``
variants import this file and take ``model.methods`` from their COCO config.
"""
from tprd.config import get_config

from .dino_r50_distill_r18_4scale_12ep import model, optimizer

NUM_CLASSES = 5
NUM_QUERIES = 30

for detector in (model.student, model.teacher):
    detector.num_classes = NUM_CLASSES
    detector.num_queries = NUM_QUERIES
    detector.select_box_nums_for_evaluation = NUM_QUERIES
    detector.dn_number = 10
    for part, layers in ((detector.transformer.encoder, 1), (detector.transformer.decoder, 2)):
        part.num_heads = 4
        part.feedforward_dim = 128
        part.num_layers = layers
del detector, part, layers  # loop variables are not config entries
# both backbones train from scratch here: trainable BatchNorm (FrozenBN would be the identity). The
# teacher, trained alone, is projects/dino/configs/dino_r50_synthetic.py (docs/workflow.md, CPU walkthrough)
for _detector in (model.student, model.teacher):
    _detector.backbone.norm = "BN"
    _detector.backbone.freeze_at = 0

# data, schedule and training loop: the CPU smoke setting of the three detectors (batch 2, 20 it)
_cpu = get_config("common/synthetic_cpu_distill.py")  # "_": not a config entry
train = _cpu.train
dataloader = _cpu.dataloader
lr_multiplier = _cpu.lr_multiplier

optimizer.lr = 2e-4  # as on COCO
