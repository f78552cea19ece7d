"""Deformable DETR R18, 50 epochs on COCO: the R50 recipe with the ResNet-18 student model."""
from .deformable_detr_r50_50ep import dataloader, lr_multiplier, optimizer, train
from .models.deformable_detr_r18 import model

model.device = "${train.device}"
train.output_dir = "./output/deformable_detr_r18_50ep"
