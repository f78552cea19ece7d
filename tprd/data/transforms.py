"""DETR data augmentation on ``torchvision.transforms.v2`` and the record -> sample mapper.

The transforms work on ``tv_tensors.Image`` + ``tv_tensors.BoundingBoxes`` (xyxy), so every
geometric change moves the boxes with the pixels. Two transforms are ours because v2 has no exact
equivalent of detectron2's semantics:

* :class:`ResizeShortestEdge` — scale ``s = short / min(h, w)``; if ``max(h, w) * s > max_size``
  then ``s = max_size / max(h, w)``; new size ``(int(h * s + 0.5), int(w * s + 0.5))``
  (``v2.Resize(max_size=...)`` and ``v2.RandomShortestSize`` truncate instead of rounding).
* :class:`RandomCrop` with detectron2's ``crop_type`` (``"absolute_range"`` is the DETR one:
  crop height and width drawn independently and uniformly from ``[min(h, lo), min(h, hi)]`` and
  ``[min(w, lo), min(w, hi)]``, then a uniformly random position).

All randomness comes from torch's RNG (like every v2 transform), so the loader's worker seeding
makes augmentation reproducible.

The standard DETR recipe (detrex ``coco_detr``) is, for training::

    RandomHorizontalFlip, then with probability 1/2 either
      [ResizeShortestEdge((480, 512, ..., 800), max_size=1333)]            or
      [ResizeShortestEdge((400, 500, 600)), RandomCrop("absolute_range", (384, 600)),
       ResizeShortestEdge((480, 512, ..., 800), max_size=1333)]

and ``ResizeShortestEdge(800, max_size=1333)`` at test time; see :func:`detr_train_augmentation`
and :class:`DetrDatasetMapper`.
"""
from __future__ import annotations

import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from .datasets import read_image

__all__ = [
    "ResizeShortestEdge",
    "RandomCrop",
    "resize_shortest_edge_size",
    "detr_train_augmentation",
    "detr_test_augmentation",
    "DetrDatasetMapper",
    "DETR_TRAIN_SCALES",
]

#: Short-edge lengths of the DETR multi-scale training resize (480..800, step 32).
DETR_TRAIN_SCALES: Tuple[int, ...] = tuple(range(480, 801, 32))


def resize_shortest_edge_size(h: int, w: int, short_edge_length: float, max_size: float = sys.maxsize) -> Tuple[int, int]:
    """Output ``(new_h, new_w)`` of detectron2's ``ResizeShortestEdge`` for an ``h x w`` image."""
    scale = float(short_edge_length) / min(h, w)
    if max(h, w) * scale > max_size:
        scale = float(max_size) / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def _canvas_size(flat_inputs: Sequence[Any]) -> Tuple[int, int]:
    """(H, W) of the image (or the boxes' canvas) among the inputs of a transform."""
    for x in flat_inputs:
        if isinstance(x, tv_tensors.BoundingBoxes):
            continue
        if isinstance(x, (tv_tensors.Image, tv_tensors.Video, tv_tensors.Mask)) or (
            isinstance(x, torch.Tensor) and not isinstance(x, tv_tensors.TVTensor)
        ):
            h, w = F.get_size(x)
            return int(h), int(w)
        try:  # PIL images
            from PIL import Image

            if isinstance(x, Image.Image):
                return x.height, x.width
        except ImportError:  # pragma: no cover
            pass
    for x in flat_inputs:
        if isinstance(x, tv_tensors.BoundingBoxes):
            return int(x.canvas_size[0]), int(x.canvas_size[1])
    raise TypeError("no image or bounding boxes among the transform inputs")


class ResizeShortestEdge(v2.Transform):
    """Resize so the short side is a random choice of ``short_edge_length``, the long side <= ``max_size``.

    Args:
        short_edge_length: an int or a sequence of ints.
        max_size: cap on the long side after resizing (detectron2 default: no cap).
        sample_style: ``"choice"`` (uniform over the given values) or ``"range"`` (uniform
            integer in ``[min, max]`` of the two given values).
        interpolation: image interpolation (bilinear with antialiasing, like PIL's resize).
    """

    def __init__(
        self,
        short_edge_length: Union[int, Sequence[int]],
        max_size: int = sys.maxsize,
        sample_style: str = "choice",
        interpolation: v2.InterpolationMode = v2.InterpolationMode.BILINEAR,
    ):
        super().__init__()
        if isinstance(short_edge_length, (int, np.integer)):
            short_edge_length = (int(short_edge_length),)
        self.short_edge_length = tuple(int(s) for s in short_edge_length)
        if not self.short_edge_length or min(self.short_edge_length) <= 0:
            raise ValueError(f"short_edge_length must be positive, got {short_edge_length!r}")
        if sample_style not in ("choice", "range"):
            raise ValueError(f"sample_style must be 'choice' or 'range', got {sample_style!r}")
        if sample_style == "range" and len(self.short_edge_length) != 2:
            raise ValueError(f"sample_style='range' needs (min, max), got {short_edge_length!r}")
        self.max_size = int(max_size)
        self.sample_style = sample_style
        self.interpolation = interpolation

    def make_params(self, flat_inputs: List[Any]) -> Dict[str, Any]:
        h, w = _canvas_size(flat_inputs)
        if self.sample_style == "range":
            lo, hi = self.short_edge_length
            short = int(torch.randint(lo, hi + 1, ()).item())
        else:
            short = self.short_edge_length[int(torch.randint(len(self.short_edge_length), ()).item())]
        size = list(resize_shortest_edge_size(h, w, short, self.max_size))
        return {"size": size, "identity": size == [h, w]}

    def transform(self, inpt: Any, params: Dict[str, Any]) -> Any:
        if params["identity"]:  # nothing to resample
            return inpt
        return self._call_kernel(F.resize, inpt, size=params["size"], interpolation=self.interpolation, antialias=True)

    def extra_repr(self) -> str:
        return f"short_edge_length={self.short_edge_length}, max_size={self.max_size}, sample_style={self.sample_style!r}"


class RandomCrop(v2.Transform):
    """detectron2's ``RandomCrop(crop_type, crop_size)`` (not ``v2.RandomCrop``: no padding, size by type).

    ``crop_type``:
        ``"relative"``: crop ``(h * ch, w * cw)`` with ``crop_size = (ch, cw)`` fractions;
        ``"relative_range"``: fractions drawn uniformly from ``[ch, 1]`` and ``[cw, 1]``;
        ``"absolute"``: ``(min(ch, h), min(cw, w))`` pixels;
        ``"absolute_range"``: height and width each drawn uniformly (integers) from
        ``[min(side, lo), min(side, hi)]`` with ``crop_size = (lo, hi)``.

    The crop position is uniform. Boxes are shifted and clipped to the crop; boxes that end up
    empty are removed later by the mapper.
    """

    _TYPES = ("relative", "relative_range", "absolute", "absolute_range")

    def __init__(self, crop_type: str, crop_size: Sequence[float]):
        super().__init__()
        if crop_type not in self._TYPES:
            raise ValueError(f"crop_type must be one of {self._TYPES}, got {crop_type!r}")
        if len(crop_size) != 2:
            raise ValueError(f"crop_size must have two values, got {crop_size!r}")
        if crop_type == "absolute_range" and not 0 < crop_size[0] <= crop_size[1]:
            raise ValueError(f"absolute_range crop_size must be (lo, hi) with 0 < lo <= hi, got {crop_size!r}")
        if crop_type.startswith("relative") and not all(0 < c <= 1 for c in crop_size):
            raise ValueError(f"relative crop_size must be in (0, 1], got {crop_size!r}")
        self.crop_type = crop_type
        self.crop_size = tuple(crop_size)

    def _crop_hw(self, h: int, w: int) -> Tuple[int, int]:
        t = self.crop_type
        if t == "relative":
            ch, cw = self.crop_size
            return int(h * ch + 0.5), int(w * cw + 0.5)
        if t == "relative_range":
            lo = torch.tensor(self.crop_size, dtype=torch.float64)
            ch, cw = (lo + torch.rand(2, dtype=torch.float64) * (1 - lo)).tolist()
            return int(h * ch + 0.5), int(w * cw + 0.5)
        if t == "absolute":
            return min(int(self.crop_size[0]), h), min(int(self.crop_size[1]), w)
        lo, hi = int(self.crop_size[0]), int(self.crop_size[1])
        ch = int(torch.randint(min(h, lo), min(h, hi) + 1, ()).item())
        cw = int(torch.randint(min(w, lo), min(w, hi) + 1, ()).item())
        return ch, cw

    def make_params(self, flat_inputs: List[Any]) -> Dict[str, Any]:
        h, w = _canvas_size(flat_inputs)
        ch, cw = self._crop_hw(h, w)
        ch, cw = max(1, min(ch, h)), max(1, min(cw, w))
        top = int(torch.randint(h - ch + 1, ()).item())
        left = int(torch.randint(w - cw + 1, ()).item())
        return {"top": top, "left": left, "height": ch, "width": cw}

    def transform(self, inpt: Any, params: Dict[str, Any]) -> Any:
        return self._call_kernel(F.crop, inpt, **params)

    def extra_repr(self) -> str:
        return f"crop_type={self.crop_type!r}, crop_size={self.crop_size}"


def detr_train_augmentation(
    scales: Sequence[int] = DETR_TRAIN_SCALES,
    max_size: int = 1333,
    crop_scales: Sequence[int] = (400, 500, 600),
    crop_size: Sequence[int] = (384, 600),
) -> Tuple[List[v2.Transform], List[v2.Transform]]:
    """``(augmentation, augmentation_with_crop)`` of the DETR training recipe (see module doc)."""
    augmentation = [v2.RandomHorizontalFlip(), ResizeShortestEdge(scales, max_size=max_size)]
    augmentation_with_crop = [
        v2.RandomHorizontalFlip(),
        ResizeShortestEdge(crop_scales),
        RandomCrop("absolute_range", crop_size),
        ResizeShortestEdge(scales, max_size=max_size),
    ]
    return augmentation, augmentation_with_crop


def detr_test_augmentation(short_edge_length: int = 800, max_size: int = 1333) -> List[v2.Transform]:
    """The DETR test-time resize."""
    return [ResizeShortestEdge(short_edge_length, max_size=max_size)]


def _compose(transforms: Union[v2.Transform, Sequence[v2.Transform]]) -> v2.Transform:
    if isinstance(transforms, v2.Transform):
        return transforms
    transforms = list(transforms)
    if not all(callable(t) for t in transforms):
        raise TypeError(f"augmentation must be a list of transforms, got {transforms!r}")
    return v2.Compose(transforms) if transforms else v2.Identity()


class DetrDatasetMapper:
    """Turn a raw record (:mod:`tprd.data.datasets`) into the sample the detectors consume.

    Output::

        {"image": uint8 [3, H, W] RGB (augmented), "height", "width": original size,
         "image_id": int, "file_name": str,
         "gt_boxes": float32 [G, 4] xyxy pixels in the frame of "image",
         "gt_classes": int64 [G] contiguous labels}

    (VOC records also pass ``file_id`` through.) Crowd boxes are never targets. After the
    augmentation, boxes are clipped to the image and boxes with width or height ``<= min_box_size``
    are dropped together with their classes (detectron2's ``filter_empty_instances``).

    Args:
        augmentation: list of v2 transforms (or one transform).
        augmentation_with_crop: optional second list; when given and ``is_train``, each sample
            uses one of the two lists with probability 1/2 (detrex ``DetrDatasetMapper``).
        is_train: test mode ignores ``augmentation_with_crop``.
        min_box_size: degenerate-box threshold in pixels.
    """

    def __init__(
        self,
        augmentation: Union[v2.Transform, Sequence[v2.Transform]],
        augmentation_with_crop: Optional[Union[v2.Transform, Sequence[v2.Transform]]] = None,
        is_train: bool = True,
        min_box_size: float = 1e-5,
    ):
        self.is_train = bool(is_train)
        self.min_box_size = float(min_box_size)
        if augmentation_with_crop is not None and self.is_train:
            self.transform = v2.RandomChoice([_compose(augmentation), _compose(augmentation_with_crop)], p=[0.5, 0.5])
        else:
            self.transform = _compose(augmentation)

    def __repr__(self) -> str:
        return f"DetrDatasetMapper(is_train={self.is_train}, transform={self.transform})"

    def __call__(self, record: Dict[str, Any]) -> Dict[str, Any]:
        return self.map_record(record, self.transform)

    def map_record(self, record: Dict[str, Any], transform: v2.Transform) -> Dict[str, Any]:
        """Read, check and transform one record with ``transform`` (see the class doc)."""
        file_name = str(record["file_name"])
        image = read_image(file_name)
        h, w = int(image.shape[-2]), int(image.shape[-1])
        exp_h, exp_w = record.get("height", h), record.get("width", w)
        if (h, w) != (int(exp_h), int(exp_w)):
            raise ValueError(
                f"image {file_name!r} is {w}x{h} (w x h) but its annotation says {exp_w}x{exp_h}; "
                "the annotation file and the image do not match"
            )
        boxes = torch.as_tensor(np.asarray(record.get("boxes", np.zeros((0, 4))), dtype=np.float32)).reshape(-1, 4)
        classes = torch.as_tensor(np.asarray(record.get("classes", np.zeros(0)), dtype=np.int64)).reshape(-1)
        crowd = record.get("iscrowd")
        if crowd is not None:
            keep = ~torch.as_tensor(np.asarray(crowd, dtype=bool)).reshape(-1)
            boxes, classes = boxes[keep], classes[keep]

        sample = {
            "image": tv_tensors.Image(image),
            "boxes": tv_tensors.BoundingBoxes(boxes, format=tv_tensors.BoundingBoxFormat.XYXY, canvas_size=(h, w)),
            "labels": classes,
        }
        out = transform(sample)
        img = out["image"].as_subclass(torch.Tensor)
        H, W = int(img.shape[-2]), int(img.shape[-1])
        b = out["boxes"].as_subclass(torch.Tensor).to(torch.float32)
        b = torch.stack([b[:, 0].clamp(0, W), b[:, 1].clamp(0, H), b[:, 2].clamp(0, W), b[:, 3].clamp(0, H)], dim=1)
        valid = ((b[:, 2] - b[:, 0]) > self.min_box_size) & ((b[:, 3] - b[:, 1]) > self.min_box_size)

        result = {
            "image": img.contiguous(),
            "height": int(exp_h),
            "width": int(exp_w),
            "image_id": int(record["image_id"]),
            "file_name": file_name,
            "gt_boxes": b[valid].contiguous(),
            "gt_classes": out["labels"][valid].to(torch.int64),
        }
        if "file_id" in record:
            result["file_id"] = record["file_id"]
        return result
