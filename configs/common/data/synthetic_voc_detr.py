"""Synthetic shapes in the Pascal VOC layout, with the VOC recipe at small sizes, for CPU runs.

Same images as ``synthetic_detr.py`` (``$DETECTRON2_DATASETS/synthetic/VOC``, generated on first
use); train on ``trainval`` with flip + resize short side 128 (long side <= 200), test on ``test``
at the same size with the VOC2007 11-point evaluator. Five classes.
"""
from omegaconf import OmegaConf
from torchvision.transforms import v2

from tprd.config import LazyCall as L
from tprd.data import (
    DetrDatasetMapper,
    ResizeShortestEdge,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset,
)
from tprd.evaluation import PascalVOCDetectionEvaluator

dataloader = OmegaConf.create()

dataloader.train = L(build_detection_train_loader)(
    dataset=L(get_detection_dataset)(names="synthetic_voc_trainval", filter_empty=True),
    mapper=L(DetrDatasetMapper)(
        augmentation=[
            L(v2.RandomHorizontalFlip)(),
            L(ResizeShortestEdge)(short_edge_length=128, max_size=200),
        ],
        augmentation_with_crop=None,
        is_train=True,
    ),
    total_batch_size=4,
    num_workers=0,
)

dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset)(names="synthetic_voc_test", filter_empty=False),
    mapper=L(DetrDatasetMapper)(
        augmentation=[L(ResizeShortestEdge)(short_edge_length=128, max_size=200)],
        is_train=False,
    ),
    num_workers=0,
)

dataloader.evaluator = L(PascalVOCDetectionEvaluator)(dataset_name="${..test.dataset.names}")
