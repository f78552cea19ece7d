"""Pascal VOC data for DETR-family detectors (the TPRD reference's VOC setting).

Train on VOC2007 trainval + VOC2012 trainval (~16.5k images) with horizontal flip and a resize to
short side 600 (long side <= 1000), no crop; test on VOC2007 test at the same size, scored by the
VOC2007 11-point AP (plus COCO-style AP over IoU 0.50:0.95) with difficult objects ignored.
Detectors must be configured for 20 classes.

Common overrides: ``dataloader.train.total_batch_size=8``, ``dataloader.train.dataset.names=...``,
``dataloader.test.dataset.names=...``.
"""
from omegaconf import OmegaConf

from tprd.config import LazyCall as L
from tprd.data import build_detection_test_loader, build_detection_train_loader, get_detection_dataset
from tprd.evaluation import PascalVOCDetectionEvaluator

from .detr_mappers import detr_test_mapper, detr_train_mapper

dataloader = OmegaConf.create()

dataloader.train = L(build_detection_train_loader)(
    dataset=L(get_detection_dataset)(names=["voc_2007_trainval", "voc_2012_trainval"], filter_empty=True),
    mapper=detr_train_mapper(600, max_size=1000),
    total_batch_size=16,
    num_workers=4,
)

dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset)(names="voc_2007_test", filter_empty=False),
    mapper=detr_test_mapper(600, max_size=1000),
    num_workers=4,
)

dataloader.evaluator = L(PascalVOCDetectionEvaluator)(dataset_name="${..test.dataset.names}")
