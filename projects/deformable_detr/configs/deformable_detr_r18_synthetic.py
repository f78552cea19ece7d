"""Deformable DETR R18 on the synthetic shapes data, small enough for a CPU (a few minutes).

Five classes, 50 queries, 2 encoder + 2 decoder layers of width 128 (4 heads, FFN 256, no
dropout), iterative box refinement, batch 4, no ImageNet weights: the backbone trains from scratch
with trainable BatchNorm. Evaluated with the COCO evaluator at the end.

Measured runs (AP per seed, what was tried): benchmarks/detectors_synthetic.md#deformable-detr.

    python projects/deformable_detr/train_net.py \
        --config-file projects/deformable_detr/configs/deformable_detr_r18_synthetic.py \
        train.output_dir=./output/deformable_synthetic
"""
from tprd.config import get_config

from .models.deformable_detr_r18 import model

# synthetic data at batch 4, AdamW lr 4e-4 (one lr for all), 600 CPU iterations, one final evaluation
_cpu = get_config("common/synthetic_cpu.py")  # "_": not a config entry
dataloader = _cpu.dataloader
optimizer = _cpu.optimizer
train = _cpu.train

DIM = 128

model.num_classes = 5
model.num_queries = 50
model.select_box_nums_for_evaluation = 50
model.embed_dim = DIM
model.with_box_refine = True  # converges much faster here (AP 11.7 vs 3.6 in one comparison)
model.backbone.norm = "BN"  # from scratch: FrozenBN would be the identity
model.backbone.freeze_at = 0
model.neck.out_channels = DIM
model.position_embedding.num_pos_feats = DIM // 2
for _part in (model.transformer.encoder, model.transformer.decoder):
    _part.embed_dim = DIM
    _part.num_heads = 4
    _part.feedforward_dim = 256
    _part.attn_dropout = 0.0
    _part.ffn_dropout = 0.0
    _part.num_layers = 2
model.device = "${train.device}"

lr_multiplier = _cpu.lr_multiplier
train.output_dir = "./output/deformable_detr_r18_synthetic"
