"""RT-DETRv2 R50vd -> R18vd distillation on the synthetic shapes, small enough for a CPU.

A smoke / tutorial setting, not a benchmark: 5 classes, 30 queries (+ up to 10 denoising queries),
hybrid encoder and decoder of width 128 (4 heads, FFN 256), **6 teacher and 3 student decoder
layers** (the L -> S stage pairing, docs/methods.md#stage-pairing), trainable BatchNorm in both
backbones (no ImageNet weights), no ``eval_spatial_size`` (anchors computed per batch), batch 2, 20
iterations, no AMP / EMA. The teacher is random unless ``train.init_checkpoint`` is a
``merge_weight.py`` file of the trained synthetic teacher (``../../configs/rtdetrv2_r50vd_synthetic.py``).
The method configs' ``..._synthetic.py`` variants import this file and take ``model.methods`` from
their COCO config.
"""
from tprd.config import get_config

from .rtdetrv2_r50vd_distill_r18vd_coco import model, optimizer

NUM_CLASSES = 5
NUM_QUERIES = 30
DIM = 128

for _detector, _layers in ((model.student, 3), (model.teacher, 6)):
    _detector.encoder.hidden_dim = DIM
    _detector.encoder.nhead = 4
    _detector.encoder.dim_feedforward = 256
    _detector.encoder.eval_spatial_size = None
    _detector.decoder.hidden_dim = DIM
    _detector.decoder.feat_channels = [DIM, DIM, DIM]
    _detector.decoder.nhead = 4
    _detector.decoder.dim_feedforward = 256
    _detector.decoder.num_layers = _layers
    _detector.decoder.num_classes = NUM_CLASSES
    _detector.decoder.num_queries = NUM_QUERIES
    _detector.decoder.num_denoising = 10
    _detector.postprocessor.num_top_queries = NUM_QUERIES
    # trained from scratch: trainable BatchNorm (FrozenBN would be the identity), nothing frozen
    _detector.backbone.freeze_norm = False
    _detector.backbone.freeze_at = -1

# data, schedule and training loop: the CPU smoke setting of every detector (batch 2, 20 it); the DETR
# mapper, not RT-DETRv2's pipeline, for the reasons in ../../configs/rtdetrv2_r18vd_synthetic.py
_cpu = get_config("common/synthetic_cpu_distill.py")  # "_": not a config entry
train = _cpu.train
dataloader = _cpu.dataloader
lr_multiplier = _cpu.lr_multiplier

optimizer.lr = 1e-4  # as on COCO
