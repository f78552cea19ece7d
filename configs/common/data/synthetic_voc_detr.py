"""Synthetic shapes in the Pascal VOC layout, with the VOC recipe at small sizes, for CPU runs.

Same images as ``synthetic_detr.py`` (``$DETECTRON2_DATASETS/synthetic/VOC``, generated on first
use); train on ``trainval`` with flip + resize short side 128 (long side <= 200), test on ``test``
at the same size with the VOC2007 11-point evaluator. Five classes.
"""
from omegaconf import OmegaConf

from tprd.config import LazyCall as L
from tprd.data import build_detection_test_loader, build_detection_train_loader, get_detection_dataset
from tprd.evaluation import PascalVOCDetectionEvaluator

from .detr_mappers import detr_test_mapper, detr_train_mapper

dataloader = OmegaConf.create()

dataloader.train = L(build_detection_train_loader)(
    dataset=L(get_detection_dataset)(names="synthetic_voc_trainval", filter_empty=True),
    mapper=detr_train_mapper(128, max_size=200),
    total_batch_size=4,
    num_workers=0,
)

dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset)(names="synthetic_voc_test", filter_empty=False),
    mapper=detr_test_mapper(128, max_size=200),
    num_workers=0,
)

dataloader.evaluator = L(PascalVOCDetectionEvaluator)(dataset_name="${..test.dataset.names}")
