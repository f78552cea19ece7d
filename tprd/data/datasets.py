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

from tprd.errors import DatasetError, ImageDecodeError

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
        raise FileNotFoundError(
            f"image file {path!r} does not exist; run tools/check_dataset.py --config-file <config> to find every "
            "missing or broken image"
        )
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            arr = np.array(im.convert("RGB"), dtype=np.uint8)  # writable copy
    except Exception as e:  # Pillow raises several exception types for broken files
        raise ImageDecodeError(
            f"cannot decode image file {path!r} ({type(e).__name__}: {e}); replace or remove it, and run "
            "tools/check_dataset.py --config-file <config> to find every such file"
        ) from None
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


# --------------------------------------------------------------------------------------------
# COCO
# --------------------------------------------------------------------------------------------
def load_coco_json(
    json_file: _PathLike, image_root: _PathLike, metadata: Optional[Any] = None, strict: Optional[bool] = None
) -> List[Dict[str, Any]]:
    """Records of every image of a COCO instances json (images without annotations included).

    The json is checked first (:func:`tprd.data.checks.check_coco_json`: parse errors with line and
    column, unknown category ids, missing image files are errors; annotations with an unknown
    ``image_id`` or a box that is not four finite numbers, of zero or negative size or outside its
    image are skipped, counted in one warning, or an error with ``strict=True`` (default: the
    ``strict_loading`` context)). Category ids are mapped to contiguous labels in sorted-id order.
    ``metadata``: a dataset's :class:`~tprd.data.catalog.Metadata` (``MetadataCatalog.get(name)``;
    anything with ``name``, ``get`` and ``set``). When it already has
    ``thing_dataset_id_to_contiguous_id`` (built-in COCO), the json's categories must agree with
    it; otherwise the json's categories are stored in it. The log line "Loaded N images, M
    annotations" counts what is used.
    """
    from .checks import check_coco_json, coco_records, strict_loading, is_strict

    json_file = Path(json_file)
    name = metadata.name if metadata is not None else json_file.name
    data = check_coco_json(json_file, image_root, name=name)
    with strict_loading(is_strict() if strict is None else strict):
        data.skips.report(name, str(json_file))

    cat_ids = sorted(c["id"] for c in data.dataset["categories"])
    id_map = {cid: i for i, cid in enumerate(cat_ids)}
    if metadata is not None:
        meta = metadata
        known = meta.get("thing_dataset_id_to_contiguous_id")
        if known is not None:
            if set(known) != set(cat_ids):
                raise DatasetError(
                    f"categories of {str(json_file)!r} (ids {cat_ids}) differ from those of dataset "
                    f"{meta.name!r} (ids {sorted(known)})"
                )
            id_map = dict(known)
        else:
            names = {c["id"]: c["name"] for c in data.dataset["categories"]}
            meta.set(
                thing_classes=[names[c] for c in cat_ids],
                thing_dataset_id_to_contiguous_id=id_map,
                thing_contiguous_id_to_dataset_id={v: k for k, v in id_map.items()},
            )
    records = coco_records(data, id_map)
    logger.info("Loaded %d images, %d annotations from %s", len(records), len(data.dataset["annotations"]), json_file)
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


def load_voc_instances(
    dirname: _PathLike, split: str, class_names: Sequence[str], strict: Optional[bool] = None,
    dataset_name: Optional[str] = None, check_files: bool = True,
) -> List[Dict[str, Any]]:
    """Records of a VOC-layout folder: ``ImageSets/Main/<split>.txt`` lists the file ids.

    Difficult objects are kept (flag ``difficult``); training uses them, as detectron2 does, and
    the VOC evaluator ignores them. Checked as :func:`load_coco_json` (:mod:`tprd.data.checks`):
    missing xml or image files, bad xml and unknown class names are errors; objects whose box is
    not four numbers, of zero or negative size or outside the image are skipped and counted.
    """
    dirname = Path(dirname)
    split_file = dirname / "ImageSets" / "Main" / f"{split}.txt"
    if not split_file.is_file():
        raise FileNotFoundError(
            f"VOC split file {str(split_file)!r} does not exist (expected {dirname}/Annotations, "
            f"{dirname}/ImageSets/Main/{split}.txt, {dirname}/JPEGImages)"
        )
    from .checks import Skips, check_box, is_strict, missing_image_files, raise_missing_images, strict_loading

    file_ids = [line.split()[0] for line in split_file.read_text().splitlines() if line.strip()]
    class_index = {c: i for i, c in enumerate(class_names)}
    image_ids = _voc_image_ids(file_ids)
    source = f"{dirname}/Annotations (split {split})"
    name = dataset_name or f"{dirname.name} ({split})"
    missing_xml = [fid for fid in file_ids if not (dirname / "Annotations" / f"{fid}.xml").is_file()]
    if missing_xml:
        raise FileNotFoundError(
            f"{len(missing_xml)} of {len(file_ids)} VOC annotations listed in {str(split_file)!r} do not exist in "
            f"{str(dirname / 'Annotations')!r}: {', '.join(f + '.xml' for f in missing_xml[:5])}"
            + (", ..." if len(missing_xml) > 5 else "")
        )
    if check_files:
        raise_missing_images(missing_image_files([f"{fid}.jpg" for fid in file_ids], dirname / "JPEGImages"),
                             len(file_ids), name, dirname / "JPEGImages", str(split_file))
    skips = Skips()
    records = []
    for fid, img_id in zip(file_ids, image_ids):
        xml_path = dirname / "Annotations" / f"{fid}.xml"
        try:
            tree = ET.parse(xml_path)
        except ET.ParseError as e:
            line, column = getattr(e, "position", (0, 0))
            raise DatasetError(f"cannot parse VOC annotation {str(xml_path)!r}: bad XML at line {line}, column {column + 1}") from None
        size = tree.find("size")
        try:
            height, width = int(float(size.findtext("height"))), int(float(size.findtext("width")))
            if height <= 0 or width <= 0:
                raise ValueError
        except (AttributeError, TypeError, ValueError):
            raise DatasetError(f"VOC annotation {str(xml_path)!r} has no valid <size><height>/<width> (positive numbers)") from None
        boxes, classes, difficult = [], [], []
        for k, obj in enumerate(tree.findall("object")):
            name = (obj.findtext("name") or "").strip()
            if name not in class_index:
                raise DatasetError(
                    f"{str(xml_path)!r}: object {k} has the class {name!r}, which is not one of the dataset's "
                    f"{len(class_names)} classes {list(class_names)}; fix the name or register the dataset with it"
                )
            skips.total += 1
            bnd = obj.find("bndbox")
            try:
                box = [float(bnd.findtext(c)) for c in ("xmin", "ymin", "xmax", "ymax")]
            except (AttributeError, TypeError, ValueError):
                skips.add("not_finite", f"{fid}#{k}")
                continue
            box[0] -= 1.0  # 1-based inclusive pixel indices -> continuous 0-based (detectron2)
            box[1] -= 1.0
            reason = check_box(box, width, height)
            if reason:
                skips.add(reason, f"{fid}#{k}")
                continue
            boxes.append(box)
            classes.append(class_index[name])
            difficult.append(int(float(obj.findtext("difficult") or 0)) == 1)
        box = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
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
    with strict_loading(is_strict() if strict is None else strict):
        skips.report(name, source, what="objects")
    logger.info("Loaded %d images, %d objects from %s (%s)", len(records), skips.total - skips.count, dirname, split)
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
