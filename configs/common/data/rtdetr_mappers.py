"""RT-DETRv2's data pipeline as lazy config nodes (docs/rt_detr.md#data-pipeline;
``tprd/data/rtdetr_transforms.py``), for ``common/rtdetr_training.py`` and the RT-DETR VOC configs.

Helper functions only (this file defines no config entries). Each op is its own node, so a config
can change one value, e.g. ``dataloader.train.mapper.early_augmentation.2.p=0.5`` (the IoU crop's
probability) or ``dataloader.train.mapper.augmentation.2.size=[512,512]``.
"""
from torchvision.transforms import v2

from tprd.config import LazyCall as L
from tprd.data import RTDETR_TRAIN_SCALES, BatchMultiScaleResize, RTDETRDatasetMapper


def rtdetr_train_mapper(size=(640, 640), stop_iter=None):
    """The reference's training ops (``include/dataloader.yml``): photometric distortion (p 0.5),
    zoom-out (fill 0) and IoU crop (p 0.8) until iteration ``stop_iter``; then always box
    sanitising (min size 1), horizontal flip, resize to ``size`` (h, w), box sanitising."""
    return L(RTDETRDatasetMapper)(
        early_augmentation=[
            L(v2.RandomPhotometricDistort)(p=0.5),
            L(v2.RandomZoomOut)(fill=0),
            L(v2.RandomApply)(transforms=[L(v2.RandomIoUCrop)()], p=0.8),
        ],
        augmentation=[
            L(v2.SanitizeBoundingBoxes)(min_size=1),
            L(v2.RandomHorizontalFlip)(),
            L(v2.Resize)(size=list(size)),
            L(v2.SanitizeBoundingBoxes)(min_size=1),
        ],
        stop_iter=stop_iter,
        is_train=True,
    )


def rtdetr_test_mapper(size=(640, 640)):
    """The reference's test-time resize to ``size`` (h, w), aspect ratio not kept."""
    return L(RTDETRDatasetMapper)(augmentation=[L(v2.Resize)(size=list(size))], is_train=False)


def rtdetr_multiscale(stop_iter=None, scales=RTDETR_TRAIN_SCALES):
    """The reference's per-batch multi-scale resize (``BatchImageCollateFuncion``): one square size
    of ``scales`` per iteration, the same on every process, until iteration ``stop_iter``."""
    return L(BatchMultiScaleResize)(scales=list(scales), stop_iter=stop_iter)
