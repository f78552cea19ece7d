"""RT-DETRv2's data pipeline (lyuwenyu/RT-DETR ``rtdetrv2_pytorch``, ``configs/rtdetrv2/include/dataloader.yml``)
on ``torchvision.transforms.v2``; docs/rt_detr.md#data-pipeline.

Training, per image (:func:`rtdetr_train_augmentation`)::

    RandomPhotometricDistort(p=0.5), RandomZoomOut(fill=0), RandomIoUCrop with p=0.8   <- "early" ops
    SanitizeBoundingBoxes(min_size=1), RandomHorizontalFlip, Resize(640x640), SanitizeBoundingBoxes(min_size=1)

then, per batch, a square size drawn from 480..800 (:data:`RTDETR_TRAIN_SCALES`) and the whole batch
resized to it (:class:`BatchMultiScaleResize`, the reference's ``BatchImageCollateFuncion``). From the
stop epoch on (the reference's ``policy: {name: stop_epoch, epoch: N}`` and the collate function's
``stop_epoch``), the early ops and the multi-scale resize are off. Test: ``Resize(640x640)`` only.

The toolbox counts iterations, so both stops are given as iterations (``stop_iter`` = stop epoch x
iterations per epoch). The train loader passes each sample's iteration to the mapper and each
batch's iteration to the batch transform (:func:`tprd.data.build_detection_train_loader`), so the
switch happens at the same iteration in every worker and process, and a ``--resume`` d run (which
skips batches of the same stream) switches where the uninterrupted run would.

Output contract: that of :class:`~tprd.data.DetrDatasetMapper` — ``"image"`` uint8 RGB ``[3,H,W]``,
``"gt_boxes"`` float32 xyxy pixels in the frame of ``"image"``. :class:`~tprd.modeling.RTDETR` divides
by 255 (its ``pixel_std``; the reference's ``ConvertPILImage(scale=True)``, no mean/std) and turns the
boxes into normalised cxcywh itself (the reference's ``ConvertBoxes(fmt="cxcywh", normalize=True)``).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from .transforms import DetrDatasetMapper, _compose

__all__ = [
    "RTDETR_TRAIN_SCALES",
    "rtdetr_train_augmentation",
    "rtdetr_test_augmentation",
    "RTDETRDatasetMapper",
    "BatchMultiScaleResize",
]

#: The reference's multi-scale sizes (``BatchImageCollateFuncion.scales``): 480..800 step 32 with 640
#: listed three times, so a batch stays at 640 with probability 3/13.
RTDETR_TRAIN_SCALES: Tuple[int, ...] = (480, 512, 544, 576, 608, 640, 640, 640, 672, 704, 736, 768, 800)


def _hw(size: Union[int, Sequence[int]]) -> List[int]:
    if isinstance(size, int):
        return [size, size]
    size = [int(s) for s in size]
    if len(size) != 2 or min(size) <= 0:
        raise ValueError(f"size must be an int or (height, width), got {size!r}")
    return size


def rtdetr_train_augmentation(size: Union[int, Sequence[int]] = 640) -> Tuple[List[v2.Transform], List[v2.Transform]]:
    """``(early, augmentation)``: the reference's training ops, split where its stop-epoch policy
    splits them (``early`` = the ops the policy turns off). ``size``: the Resize target ``(h, w)``."""
    early = [
        v2.RandomPhotometricDistort(p=0.5),
        v2.RandomZoomOut(fill=0),
        v2.RandomApply([v2.RandomIoUCrop()], p=0.8),  # the reference's RandomIoUCrop(p=0.8)
    ]
    augmentation = [
        v2.SanitizeBoundingBoxes(min_size=1),
        v2.RandomHorizontalFlip(),
        v2.Resize(_hw(size)),
        v2.SanitizeBoundingBoxes(min_size=1),
    ]
    return early, augmentation


def rtdetr_test_augmentation(size: Union[int, Sequence[int]] = 640) -> List[v2.Transform]:
    """The reference's test-time ``Resize(640x640)`` (aspect ratio not kept)."""
    return [v2.Resize(_hw(size))]


class RTDETRDatasetMapper(DetrDatasetMapper):
    """:class:`~tprd.data.DetrDatasetMapper` (same record in, same sample out) with the stop-epoch policy.

    Each training sample goes through ``early_augmentation`` then ``augmentation``, or through
    ``augmentation`` alone when its iteration is ``>= stop_iter``. The train loader passes the
    iteration (``takes_iteration``); called without one (``iteration=None``), the mapper applies the
    early ops too. Boxes and their classes are dropped together (``SanitizeBoundingBoxes`` finds the
    ``"labels"`` entry of the sample it transforms).

    Args:
        augmentation: v2 transforms applied to every sample (see :func:`rtdetr_train_augmentation`).
        early_augmentation: v2 transforms applied before ``augmentation`` until ``stop_iter``.
        stop_iter: first iteration without ``early_augmentation`` (``None``: never stop); the
            reference's stop epoch x iterations per epoch.
        is_train: test mode ignores ``early_augmentation``.
        min_box_size: the degenerate-box threshold of :class:`~tprd.data.DetrDatasetMapper` (after
            ``SanitizeBoundingBoxes(min_size=1)`` it removes nothing more).
    """

    takes_iteration = True

    def __init__(
        self,
        augmentation: Union[v2.Transform, Sequence[v2.Transform]],
        early_augmentation: Optional[Union[v2.Transform, Sequence[v2.Transform]]] = None,
        stop_iter: Optional[int] = None,
        is_train: bool = True,
        min_box_size: float = 1e-5,
    ):
        super().__init__(augmentation, is_train=is_train, min_box_size=min_box_size)
        if stop_iter is not None and int(stop_iter) < 0:
            raise ValueError(f"stop_iter must be >= 0 or None, got {stop_iter!r}")
        self.stop_iter = None if stop_iter is None else int(stop_iter)
        self.full_transform = None
        if early_augmentation is not None and self.is_train:
            self.full_transform = v2.Compose([_compose(early_augmentation), self.transform])

    def __repr__(self) -> str:
        return (f"RTDETRDatasetMapper(is_train={self.is_train}, stop_iter={self.stop_iter}, "
                f"transform={self.full_transform or self.transform})")

    def early_ops_on(self, iteration: Optional[int]) -> bool:
        """Whether a sample of ``iteration`` goes through the early ops."""
        if self.full_transform is None:
            return False
        return self.stop_iter is None or iteration is None or int(iteration) < self.stop_iter

    def __call__(self, record: Dict[str, Any], iteration: Optional[int] = None) -> Dict[str, Any]:
        transform = self.full_transform if self.early_ops_on(iteration) else self.transform
        return self.map_record(record, transform)


class BatchMultiScaleResize:
    """Resize every image of a batch to one square size drawn from ``scales`` (the reference's
    ``BatchImageCollateFuncion``), until iteration ``stop_iter``.

    A train loader's ``batch_transform`` (:func:`tprd.data.build_detection_train_loader`): called as
    ``(samples, iteration)`` under a torch seed of the loader's seed and the iteration, so all
    processes draw the same size at an iteration. Images are resized with nearest-neighbour
    interpolation (the reference's ``F.interpolate`` default) and ``gt_boxes`` are scaled with them;
    ``height`` / ``width`` (the original size) are kept. The reference resizes a stacked batch of
    640x640 images; here each image of the list is resized, which is the same thing.

    Args:
        scales: square sizes to draw from (uniformly; a size listed twice is twice as likely).
        stop_iter: first iteration that keeps the mapper's size (``None``: never stop).
        interpolation: image interpolation.
    """

    def __init__(self, scales: Sequence[int] = RTDETR_TRAIN_SCALES, stop_iter: Optional[int] = None,
                 interpolation: v2.InterpolationMode = v2.InterpolationMode.NEAREST):
        self.scales = tuple(int(s) for s in scales)
        if not self.scales or min(self.scales) <= 0:
            raise ValueError(f"scales must be positive sizes, got {scales!r}")
        self.stop_iter = None if stop_iter is None else int(stop_iter)
        self.interpolation = interpolation

    def __repr__(self) -> str:
        return f"BatchMultiScaleResize(scales={self.scales}, stop_iter={self.stop_iter})"

    def size_at(self, iteration: int) -> Optional[int]:
        """The size drawn for a batch (from torch's generator), or ``None`` from ``stop_iter`` on."""
        if self.stop_iter is not None and int(iteration) >= self.stop_iter:
            return None
        return self.scales[int(torch.randint(len(self.scales), ()).item())]

    def __call__(self, samples: List[Dict[str, Any]], iteration: int) -> List[Dict[str, Any]]:
        size = self.size_at(iteration)
        if size is None:
            return samples
        out = []
        for s in samples:
            image = s["image"]
            h, w = int(image.shape[-2]), int(image.shape[-1])
            resized = dict(s)
            if (h, w) != (size, size):
                resized["image"] = F.resize(tv_tensors.Image(image), [size, size], interpolation=self.interpolation,
                                            antialias=False).as_subclass(torch.Tensor)
                boxes = tv_tensors.BoundingBoxes(s["gt_boxes"], format=tv_tensors.BoundingBoxFormat.XYXY,
                                                 canvas_size=(h, w))
                resized["gt_boxes"] = F.resize(boxes, [size, size]).as_subclass(torch.Tensor)
            out.append(resized)
        return out
