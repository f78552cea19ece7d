"""Dataset mappers of the DETR data recipe, for the ``common/data/*.py`` configs.

Helper functions only (this file defines no config entries); each returns a lazy
``DetrDatasetMapper`` node, e.g. ``mapper=detr_train_mapper([480, 512], max_size=1333)``.
"""
from torchvision.transforms import v2

from tprd.config import LazyCall as L
from tprd.data import DetrDatasetMapper, RandomCrop, ResizeShortestEdge


def detr_train_mapper(short_edge_length, max_size, crop_resize=None, crop_size=None):
    """Horizontal flip, then a resize of the short side to (one of) ``short_edge_length`` with the
    long side <= ``max_size``. With ``crop_resize`` and ``crop_size``, half of the images take the
    crop branch instead: flip, resize the short side to one of ``crop_resize``, crop a random
    ``crop_size`` range of pixels (each side), then resize as the others."""
    augmentation_with_crop = None
    if crop_resize is not None:
        augmentation_with_crop = [
            L(v2.RandomHorizontalFlip)(),
            L(ResizeShortestEdge)(short_edge_length=crop_resize),
            L(RandomCrop)(crop_type="absolute_range", crop_size=crop_size),
            L(ResizeShortestEdge)(short_edge_length=short_edge_length, max_size=max_size),
        ]
    return L(DetrDatasetMapper)(
        augmentation=[
            L(v2.RandomHorizontalFlip)(),
            L(ResizeShortestEdge)(short_edge_length=short_edge_length, max_size=max_size),
        ],
        augmentation_with_crop=augmentation_with_crop,
        is_train=True,
    )


def detr_test_mapper(short_edge_length, max_size):
    """A resize of the short side to ``short_edge_length`` with the long side <= ``max_size``."""
    return L(DetrDatasetMapper)(
        augmentation=[L(ResizeShortestEdge)(short_edge_length=short_edge_length, max_size=max_size)],
        is_train=False,
    )
