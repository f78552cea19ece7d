"""DAB-DETR R50 -> R18 distillation on the synthetic shapes, small enough for a CPU.

A smoke / tutorial setting, not a benchmark: 5 classes, 30 queries, width 64, 1 encoder + 2 decoder
layers in both models, batch 2, 20 iterations, no pretrained weights (the teacher is random unless train.init_checkpoint is a merge_weight.py file of
the trained synthetic teacher). The
method configs' ``..._synthetic.py`` variants import this file and take ``model.methods`` from their
COCO config.
"""
from tprd.config import get_config

from .dab_detr_r50_distill_r18_50ep import model, optimizer

NUM_CLASSES = 5
NUM_QUERIES = 30
DIM = 64

for detector in (model.student, model.teacher):
    detector.num_classes = NUM_CLASSES
    detector.num_queries = NUM_QUERIES
    detector.select_box_nums_for_evaluation = NUM_QUERIES
    detector.embed_dim = DIM
    detector.position_embedding.num_pos_feats = DIM // 2
    for part, layers in ((detector.transformer.encoder, 1), (detector.transformer.decoder, 2)):
        part.embed_dim = DIM
        part.num_heads = 4
        part.feedforward_dim = 2 * DIM
        part.num_layers = layers
del detector, part, layers  # loop variables are not config entries
# both backbones train from scratch here: trainable BatchNorm (FrozenBN would be the identity). The
# teacher, trained alone, is projects/dab_detr/configs/dab_detr_r50_synthetic.py (docs/workflow.md, CPU walkthrough)
for _detector in (model.student, model.teacher):
    _detector.backbone.norm = "BN"
    _detector.backbone.freeze_at = 0

# data, schedule and training loop: the CPU smoke setting of the three detectors (batch 2, 20 it)
_cpu = get_config("common/synthetic_cpu_distill.py")  # "_": not a config entry
train = _cpu.train
dataloader = _cpu.dataloader
lr_multiplier = _cpu.lr_multiplier

optimizer.lr = 1e-4  # as on COCO
