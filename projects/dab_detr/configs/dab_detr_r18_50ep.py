"""DAB-DETR R18, 50 epochs on COCO: the R50 recipe with the ResNet-18 student model."""
from .dab_detr_r50_50ep import dataloader, lr_multiplier, optimizer, train
from .models.dab_detr_r18 import model

train.output_dir = "./output/dab_detr_r18_50ep"
