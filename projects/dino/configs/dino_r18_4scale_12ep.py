"""DINO-4scale R18, 12 epochs on COCO: the R50 recipe with the ResNet-18 student model."""
from .dino_r50_4scale_12ep import dataloader, lr_multiplier, optimizer, train
from .models.dino_r18 import model

model.device = "${train.device}"
train.output_dir = "./output/dino_r18_4scale_12ep"
