"""RT-DETRv2 R18vd on the synthetic shapes data, small enough for a CPU (docs/rt_detr.md).

Five classes, 50 queries (+ up to 20 denoising queries), hybrid encoder and decoder of width 128
(4 heads, FFN 256), 2 decoder layers, batch 4, no ImageNet weights (the backbone trains from scratch
with trainable BatchNorm). No ``eval_spatial_size``: the synthetic images vary in size, so anchors and
position embeddings are computed per batch (the images are padded to multiples of 32). The CPU
schedule, data and evaluation are those of the other detectors' synthetic configs
(``common/synthetic_cpu.py``); no run has been measured with this config yet.

    python projects/rt_detr/train_net.py \
        --config-file projects/rt_detr/configs/rtdetrv2_r18vd_synthetic.py train.output_dir=./output/rtdetr_synthetic
"""
from tprd.config import get_config

from .models.rtdetrv2_r18vd import model

# Data: the DETR mapper of the other detectors' synthetic configs, not RT-DETRv2's pipeline
# (docs/rt_detr.md#training-recipe). That pipeline resizes to 640x640 (20x the pixels of the 128x160
# images, so a CPU step costs many times more), and its zoom-out (up to 4x smaller objects) and IoU
# crops are made for 72-120 epoch schedules, not for a few hundred iterations; the DETR mapper also
# keeps these runs comparable with the other detectors'. Tests run the RT-DETR pipeline on this model
# at small sizes (tests/test_rtdetr_transforms.py).
_cpu = get_config("common/synthetic_cpu.py")  # "_": not a config entry
dataloader = _cpu.dataloader
optimizer = _cpu.optimizer
train = _cpu.train
lr_multiplier = _cpu.lr_multiplier

DIM = 128

model.encoder.hidden_dim = DIM
model.encoder.nhead = 4
model.encoder.dim_feedforward = 256
model.encoder.eval_spatial_size = None
model.decoder.hidden_dim = DIM
model.decoder.feat_channels = [DIM, DIM, DIM]
model.decoder.nhead = 4
model.decoder.dim_feedforward = 256
model.decoder.num_layers = 2
model.decoder.num_classes = 5
model.decoder.num_queries = 50
model.decoder.num_denoising = 20
model.postprocessor.num_top_queries = 50
model.device = "${train.device}"

train.output_dir = "./output/rtdetrv2_r18vd_synthetic"
