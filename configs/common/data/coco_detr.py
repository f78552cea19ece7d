"""COCO 2017 data for DETR-family detectors (detrex ``coco_detr`` recipe).

Train: horizontal flip, then with probability 1/2 either a multi-scale resize (short side
480..800 step 32, long side <= 1333) or [resize short 400/500/600 -> random crop of 384..600 px
(each side) -> multi-scale resize]. Test: short side 800, long side <= 1333.

Common overrides: ``dataloader.train.total_batch_size=8``, ``dataloader.train.dataset.names=...``,
``dataloader.test.dataset.names=...``, ``dataloader.train.num_workers=2``.
"""
from omegaconf import OmegaConf

from tprd.config import LazyCall as L
from tprd.data import build_detection_test_loader, build_detection_train_loader, get_detection_dataset
from tprd.evaluation import COCOEvaluator

from .detr_mappers import detr_test_mapper, detr_train_mapper

_SCALES = [480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800]

dataloader = OmegaConf.create()

dataloader.train = L(build_detection_train_loader)(
    dataset=L(get_detection_dataset)(names="coco_2017_train", filter_empty=True),
    mapper=detr_train_mapper(_SCALES, max_size=1333, crop_resize=[400, 500, 600], crop_size=[384, 600]),
    total_batch_size=16,
    num_workers=4,
)

dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset)(names="coco_2017_val", filter_empty=False),
    mapper=detr_test_mapper(800, max_size=1333),
    num_workers=4,
)

dataloader.evaluator = L(COCOEvaluator)(dataset_name="${..test.dataset.names}")
