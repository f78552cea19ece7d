"""Deformable DETR R18: the student (TPRD ``cfg_distill/*/models/distill_deformable_detr_r18.py``).

Identical to the R50 teacher except the backbone: ResNet-18, so the neck reads res3/res4/res5 with
128/256/512 channels (the extra level from res5: 512).
"""
from .deformable_detr_r50 import model

model.backbone.depth = 18
model.neck.in_channels = [128, 256, 512]
