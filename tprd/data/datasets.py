"""Raw detection records from COCO json files and Pascal VOC folders, and image reading.

A **record** describes one image before augmentation (the mapper in :mod:`tprd.data.transforms`
turns it into the network input)::

    {
      "file_name": str,          # absolute or root-relative path of the image
      "height": int, "width": int,   # original image size
      "image_id": int,           # COCO image id; for VOC the digits of the file id (see below)
      "boxes": float32 [G, 4],   # xyxy, absolute pixels, original frame
      "classes": int64 [G],      # contiguous labels 0..C-1
      "iscrowd": bool [G],       # COCO crowd regions (never used as training targets)
      # VOC only:
      "difficult": bool [G], "file_id": str,
    }

Boxes are arrays rather than detectron2's list of per-object dicts, so the mapper can transform
all boxes of an image at once.

Coordinate conventions (the same as detectron2's loaders):

* COCO ``bbox = [x, y, w, h]`` becomes ``[x, y, x + w, y + h]``.
* VOC xml holds 1-based inclusive pixel indices; a box becomes ``[xmin - 1, ymin - 1, xmax, ymax]``,
  i.e. continuous 0-based coordinates where pixel ``i`` covers ``[i, i + 1)``.

VOC ``image_id``: the file id with underscores removed, as an int (``"000005"`` -> 5,
``"2008_000002"`` -> 2008000002), unique across VOC2007 and VOC2012; if a split holds file ids
that are not of that form, every image of that split gets its position in the split file instead.
"""
from __future__ import annotations

import contextlib
import io
import logging
import pickle
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "load_coco_json",
    "load_voc_instances",
    "read_image",
    "filter_empty_records",
    "CocoDetectionDataset",
    "VOCDetectionDataset",
    "DatasetFromList",
    "MapDataset",
]

logger = logging.getLogger(__name__)
_PathLike = Union[str, Path]


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------
def read_image(path: _PathLike) -> torch.Tensor:
    """Read an image file as a uint8 RGB tensor ``[3, H, W]`` with Pillow (EXIF orientation applied).

    Raises :class:`FileNotFoundError` / :class:`OSError` naming the file when it is missing or
    cannot be decoded. (Pillow, as detectron2; torchvision's decoders are deprecated since 0.29.)
    """
    from PIL import Image, ImageOps

    path = str(path)
    if not Path(path).is_file():
        raise FileNotFoundError(f"image file {path!r} does not exist")
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            arr = np.array(im.convert("RGB"), dtype=np.uint8)  # writable copy
    except Exception as e:  # Pillow raises several exception types for broken files
        raise OSError(f"cannot read image file {path!r}: {e}") from e
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


# --------------------------------------------------------------------------------------------
# COCO
# --------------------------------------------------------------------------------------------
def load_coco_json(json_file: _PathLike, image_root: _PathLike, metadata: Optional[Any] = None) -> List[Dict[str, Any]]:
    """Records of every image of a COCO instances json (images without annotations included).

    Category ids are mapped to contiguous labels in sorted-id order. ``metadata``: a dataset's
    :class:`~tprd.data.catalog.Metadata` (``MetadataCatalog.get(name)``; anything with ``name``,
    ``get`` and ``set``). When it already has ``thing_dataset_id_to_contiguous_id`` (built-in
    COCO), the json's categories must agree with it; otherwise the json's categories are stored in
    it.
    """
    from pycocotools.coco import COCO

    json_file = Path(json_file)
    if not json_file.is_file():
        raise FileNotFoundError(f"COCO annotation file {str(json_file)!r} does not exist")
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            coco = COCO(str(json_file))
        except Exception as e:
            raise ValueError(f"cannot parse COCO annotation file {str(json_file)!r}: {e}") from e

    cat_ids = sorted(coco.getCatIds())
    id_map = {cid: i for i, cid in enumerate(cat_ids)}
    if metadata is not None:
        meta = metadata
        known = meta.get("thing_dataset_id_to_contiguous_id")
        if known is not None:
            if set(known) != set(cat_ids):
                raise ValueError(
                    f"categories of {str(json_file)!r} (ids {cat_ids}) differ from those of dataset "
                    f"{meta.name!r} (ids {sorted(known)})"
                )
            id_map = dict(known)
        else:
            names = [c["name"] for c in coco.loadCats(cat_ids)]
            meta.set(
                thing_classes=names,
                thing_dataset_id_to_contiguous_id=id_map,
                thing_contiguous_id_to_dataset_id={v: k for k, v in id_map.items()},
            )

    image_ids = sorted(coco.imgs.keys())
    anns = coco.dataset.get("annotations", [])
    n = len(anns)
    ann_img = np.fromiter((a["image_id"] for a in anns), dtype=np.int64, count=n)
    ann_box = np.asarray([a["bbox"] for a in anns], dtype=np.float64).reshape(n, 4)
    unknown = {a["category_id"] for a in anns} - set(id_map)
    if unknown:
        raise ValueError(f"{str(json_file)!r}: annotations use category ids {sorted(unknown)} not in its categories")
    ann_cls = np.fromiter((id_map[a["category_id"]] for a in anns), dtype=np.int64, count=n)
    ann_crowd = np.fromiter((bool(a.get("iscrowd", 0) or a.get("ignore", 0)) for a in anns), dtype=bool, count=n)
    xyxy = np.concatenate([ann_box[:, :2], ann_box[:, :2] + ann_box[:, 2:]], axis=1).astype(np.float32)

    # Group annotations by image with one stable sort (keeps json order within an image).
    order = np.argsort(ann_img, kind="stable")
    sorted_img = ann_img[order]
    ids_arr = np.asarray(image_ids, dtype=np.int64)
    starts = np.searchsorted(sorted_img, ids_arr, side="left")
    ends = np.searchsorted(sorted_img, ids_arr, side="right")

    root = Path(image_root)
    records = []
    for img_id, s, e in zip(image_ids, starts.tolist(), ends.tolist()):
        info = coco.imgs[img_id]
        sel = order[s:e]
        records.append(
            {
                "file_name": str(root / info["file_name"]),
                "height": int(info["height"]),
                "width": int(info["width"]),
                "image_id": int(img_id),
                "boxes": xyxy[sel],
                "classes": ann_cls[sel],
                "iscrowd": ann_crowd[sel],
            }
        )
    logger.info("Loaded %d images, %d annotations from %s", len(records), n, json_file)
    return records


# --------------------------------------------------------------------------------------------
# Pascal VOC
# --------------------------------------------------------------------------------------------
def _voc_image_ids(file_ids: Sequence[str]) -> List[int]:
    digits = [f.replace("_", "") for f in file_ids]
    if all(d.isdigit() for d in digits):
        ids = [int(d) for d in digits]
        if len(set(ids)) == len(ids):
            return ids
    return list(range(len(file_ids)))


def load_voc_instances(dirname: _PathLike, split: str, class_names: Sequence[str]) -> List[Dict[str, Any]]:
    """Records of a VOC-layout folder: ``ImageSets/Main/<split>.txt`` lists the file ids.

    Difficult objects are kept (flag ``difficult``); training uses them, as detectron2 does, and
    the VOC evaluator ignores them.
    """
    dirname = Path(dirname)
    split_file = dirname / "ImageSets" / "Main" / f"{split}.txt"
    if not split_file.is_file():
        raise FileNotFoundError(
            f"VOC split file {str(split_file)!r} does not exist (expected {dirname}/Annotations, "
            f"{dirname}/ImageSets/Main/{split}.txt, {dirname}/JPEGImages)"
        )
    file_ids = [line.split()[0] for line in split_file.read_text().splitlines() if line.strip()]
    class_index = {c: i for i, c in enumerate(class_names)}
    image_ids = _voc_image_ids(file_ids)
    records = []
    for fid, img_id in zip(file_ids, image_ids):
        xml_path = dirname / "Annotations" / f"{fid}.xml"
        try:
            tree = ET.parse(xml_path)
        except FileNotFoundError:
            raise FileNotFoundError(f"VOC annotation {str(xml_path)!r} (listed in {str(split_file)!r}) does not exist") from None
        except ET.ParseError as e:
            raise ValueError(f"cannot parse VOC annotation {str(xml_path)!r}: {e}") from e
        size = tree.find("size")
        try:
            height, width = int(float(size.findtext("height"))), int(float(size.findtext("width")))
        except (AttributeError, TypeError, ValueError):
            raise ValueError(f"VOC annotation {str(xml_path)!r} has no valid <size><height>/<width>") from None
        boxes, classes, difficult = [], [], []
        for obj in tree.findall("object"):
            name = (obj.findtext("name") or "").strip()
            if name not in class_index:
                raise ValueError(f"{str(xml_path)!r}: unknown class {name!r}; known classes: {list(class_names)}")
            bnd = obj.find("bndbox")
            try:
                boxes.append([float(bnd.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")])
            except (AttributeError, TypeError, ValueError):
                raise ValueError(f"{str(xml_path)!r}: object {name!r} has no valid <bndbox>") from None
            classes.append(class_index[name])
            difficult.append(int(float(obj.findtext("difficult") or 0)) == 1)
        box = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        box[:, :2] -= 1.0  # 1-based inclusive pixel indices -> continuous 0-based (detectron2)
        records.append(
            {
                "file_name": str(dirname / "JPEGImages" / f"{fid}.jpg"),
                "height": height,
                "width": width,
                "image_id": int(img_id),
                "file_id": fid,
                "boxes": box,
                "classes": np.asarray(classes, dtype=np.int64),
                "iscrowd": np.zeros(len(classes), dtype=bool),
                "difficult": np.asarray(difficult, dtype=bool),
            }
        )
    logger.info("Loaded %d images from %s (%s)", len(records), dirname, split)
    return records


# --------------------------------------------------------------------------------------------
# Filtering and containers
# --------------------------------------------------------------------------------------------
def filter_empty_records(records: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Drop images that have no non-crowd box (detectron2's ``filter_empty=True``)."""
    kept = [r for r in records if int((~np.asarray(r["iscrowd"], dtype=bool)).sum()) > 0]
    if len(kept) != len(records):
        logger.info("Removed %d images without (non-crowd) annotations; %d left", len(records) - len(kept), len(kept))
    return kept


class DatasetFromList(Dataset):
    """A map-style dataset over a list of records.

    With ``serialize=True`` (default) the records are pickled into one numpy byte buffer, so
    data-loader workers forked from the main process share it instead of slowly copying every
    Python object they touch (reference counting writes to each object's page).
    """

    def __init__(self, records: Sequence[Any], serialize: bool = True):
        self._serialize = bool(serialize)
        if self._serialize:
            blobs = [np.frombuffer(pickle.dumps(r, protocol=pickle.HIGHEST_PROTOCOL), dtype=np.uint8) for r in records]
            self._addr = np.cumsum(np.asarray([len(b) for b in blobs], dtype=np.int64))
            self._buf = np.concatenate(blobs) if blobs else np.zeros(0, dtype=np.uint8)
        else:
            self._list = list(records)

    def __len__(self) -> int:
        return len(self._addr) if self._serialize else len(self._list)

    def __getitem__(self, idx: Union[int, slice]) -> Any:
        if isinstance(idx, slice):  # a list of records
            return [self[i] for i in range(*idx.indices(len(self)))]
        if not self._serialize:
            return self._list[idx]
        n = len(self._addr)
        if idx < 0:
            idx += n
        if not 0 <= idx < n:
            raise IndexError(f"index {idx} out of range for a dataset of {n} records")
        start = 0 if idx == 0 else int(self._addr[idx - 1])
        return pickle.loads(self._buf[start : int(self._addr[idx])].tobytes())


class MapDataset(Dataset):
    """``mapper(dataset[i])`` for every ``i``; the mapping runs in the data-loader workers."""

    def __init__(self, dataset: Any, mapper: Any):
        self.dataset = dataset
        self.mapper = mapper

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx: int) -> Any:
        return self.mapper(self.dataset[idx])


class CocoDetectionDataset(DatasetFromList):
    """Records of a COCO instances json (optionally without empty images)."""

    def __init__(self, json_file: _PathLike, image_root: _PathLike, filter_empty: bool = False, metadata: Optional[Any] = None):
        records = load_coco_json(json_file, image_root, metadata=metadata)
        super().__init__(filter_empty_records(records) if filter_empty else records)


class VOCDetectionDataset(DatasetFromList):
    """Records of a Pascal VOC folder split (optionally without empty images)."""

    def __init__(self, dirname: _PathLike, split: str, class_names: Sequence[str], filter_empty: bool = False):
        records = load_voc_instances(dirname, split, class_names)
        super().__init__(filter_empty_records(records) if filter_empty else records)
