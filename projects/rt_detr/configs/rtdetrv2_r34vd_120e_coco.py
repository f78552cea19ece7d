"""RT-DETRv2-M*: R34vd, 4 decoder layers (official ``rtdetrv2_r34vd_120e_coco.yml``).

Model settings only (see ``rtdetrv2_r18vd_120e_coco.py``); weights ``rtdetrv2_r34vd_120e_coco_ema.pth``.
"""
from .models.rtdetrv2_r18vd import model

model.backbone.depth = 34
model.decoder.num_layers = 4
