"""Synthetic shapes (COCO layout) with the DETR augmentation recipe at small sizes, for CPU runs.

The 128x160 images of ``tprd.data.synthetic`` (generated under ``$DETECTRON2_DATASETS/synthetic``
on first use) keep roughly their size: training resizes the short side to 112..160 (long side
<= 200), or resizes, crops 96..128 px and resizes again; testing resizes the short side to 128
(long side <= 200), i.e. leaves the images as they are. Five classes, COCO evaluation.
"""
from omegaconf import OmegaConf

from tprd.config import LazyCall as L
from tprd.data import build_detection_test_loader, build_detection_train_loader, get_detection_dataset
from tprd.evaluation import COCOEvaluator

from .detr_mappers import detr_test_mapper, detr_train_mapper

_SCALES = [112, 120, 128, 136, 144, 152, 160]

dataloader = OmegaConf.create()

dataloader.train = L(build_detection_train_loader)(
    dataset=L(get_detection_dataset)(names="synthetic_train", filter_empty=True),
    mapper=detr_train_mapper(_SCALES, max_size=200, crop_resize=[112, 128, 144], crop_size=[96, 128]),
    total_batch_size=4,
    num_workers=0,
)

dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset)(names="synthetic_val", filter_empty=False),
    mapper=detr_test_mapper(128, max_size=200),
    num_workers=0,
)

dataloader.evaluator = L(COCOEvaluator)(dataset_name="${..test.dataset.names}")
