"""RT-DETRv2-X: R101vd, hybrid encoder of width 384 (FFN 2048), 6 decoder layers of width 256
(official ``rtdetrv2_r101vd_6x_coco.yml``).

Model settings only (see ``rtdetrv2_r18vd_120e_coco.py``); weights
``rtdetrv2_r101vd_6x_coco_from_paddle.pth`` (nested as ``{"ema": {"module": ...}}``).
"""
from .models.rtdetrv2_r50vd import model

model.backbone.depth = 101
model.encoder.hidden_dim = 384
model.encoder.dim_feedforward = 2048
model.decoder.feat_channels = [384, 384, 384]
