"""DAB-DETR R18: the student (TPRD ``cfg_distill/KD-DETR*/models/distill_dab_detr_r18.py``).

Identical to the R50 teacher except the backbone (ResNet-18, res5 has 512 channels).
"""
from .dab_detr_r50 import model

model.backbone.depth = 18
model.in_channels = 512
