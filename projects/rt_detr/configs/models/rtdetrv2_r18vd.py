"""RT-DETRv2 R18vd (official ``rtdetrv2_r18vd_120e_coco.yml`` model): the R50vd base with
PResNet-18vd (plain BatchNorm, nothing frozen), CSP expansion 0.5 and 3 decoder layers."""
from .rtdetrv2_r50vd import model

model.backbone.depth = 18
model.backbone.freeze_at = -1
model.backbone.freeze_norm = False
model.encoder.in_channels = [128, 256, 512]
model.encoder.expansion = 0.5
model.decoder.num_layers = 3
