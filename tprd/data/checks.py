"""Dataset checks done when a dataset is loaded (cheap: no image is decoded).

Errors (:class:`~tprd.errors.DatasetError`, or ``FileNotFoundError`` for a missing file or
folder), each naming the file and the fix:

* an annotation file that does not parse (file, line, column) or lacks ``images`` /
  ``categories``; images without ``id`` / ``file_name`` / positive ``height`` and ``width``;
  duplicate image or category ids;
* annotations whose ``category_id`` is not listed in ``categories``;
* image files named by the annotations but missing on disk (how many, the first few names);
* (in :func:`tprd.data.get_detection_dataset_dicts`) a training set without any annotation.

Counted and skipped (one warning line per dataset, :meth:`Skips.describe`; with ``strict`` they are
errors too): annotations whose ``image_id`` is not in ``images``, boxes that are not four finite
numbers, boxes of zero or negative size, boxes entirely outside their image (a box partly outside
is kept; the transforms clip it). Training (:func:`tprd.data.load_coco_json`,
:func:`tprd.data.load_voc_instances`) and evaluation (:class:`tprd.evaluation.COCOEvaluator`,
:class:`tprd.evaluation.PascalVOCDetectionEvaluator`) use the same kept annotations.

``tools/check_dataset.py`` runs these checks and decodes every image as well.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from tprd.errors import DatasetError

__all__ = [
    "Skips",
    "CocoData",
    "read_json",
    "check_coco_json",
    "check_box",
    "missing_image_files",
    "strict_loading",
    "is_strict",
    "SKIP_REASONS",
]

logger = logging.getLogger(__name__)

_PathLike = Union[str, os.PathLike]

#: Why an annotation is skipped, in the order the checks run, with the words of the warning.
SKIP_REASONS: Dict[str, str] = {
    "unknown_image": "with an image_id not in images",
    "not_finite": "whose bbox is not four finite numbers",
    "empty": "with zero or negative size",
    "outside": "outside its image",
}

_STRICT: contextvars.ContextVar[bool] = contextvars.ContextVar("tprd_strict_datasets", default=False)


@contextlib.contextmanager
def strict_loading(strict: bool = True) -> Iterator[None]:
    """Inside the block, datasets are loaded strictly: skipped annotations are an error."""
    token = _STRICT.set(bool(strict))
    try:
        yield
    finally:
        _STRICT.reset(token)


def is_strict() -> bool:
    return _STRICT.get()


def _listing(items: Sequence[Any], limit: int = 5) -> str:
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (", ..." if len(items) > limit else "")


@dataclass
class Skips:
    """Annotations left out of a dataset, by reason (:data:`SKIP_REASONS`), as annotation ids."""

    total: int = 0
    ids: Dict[str, List[Any]] = field(default_factory=lambda: {k: [] for k in SKIP_REASONS})

    def add(self, reason: str, ann_id: Any) -> None:
        self.ids[reason].append(ann_id)

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.ids.values())

    def describe(self, name: str, what: str = "annotations") -> str:
        """``shapes_train: skipped 3 of 1402 annotations: 2 with zero or negative size (ids 4, 9), 1 ...``"""
        parts = []
        for reason, words in SKIP_REASONS.items():
            found = self.ids[reason]
            if found:
                label = "id" if len(found) == 1 else "ids"
                parts.append(f"{len(found)} {words} ({label} {_listing(found)})")
        return f"{name}: skipped {self.count} of {self.total} {what}: " + ", ".join(parts)

    def report(self, name: str, source: str, what: str = "annotations") -> None:
        """Warn (one line) or, when loading strictly, raise :class:`DatasetError`."""
        if not self.count:
            return
        text = self.describe(name, what)
        if is_strict():
            raise DatasetError(
                f"{text} (in {source}; strict loading: fix or remove them, or set strict=False to skip them)"
            )
        logger.warning(text)


def check_box(box: Any, width: float, height: float) -> Optional[str]:
    """The reason (a key of :data:`SKIP_REASONS`) to skip an ``xyxy`` box of an image of that size, or None."""
    try:
        values = [float(v) for v in box]
    except (TypeError, ValueError):
        return "not_finite"
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        return "not_finite"
    x0, y0, x1, y1 = values
    if x1 <= x0 or y1 <= y0:
        return "empty"
    if min(x1, width) <= max(x0, 0.0) or min(y1, height) <= max(y0, 0.0):
        return "outside"
    return None


def read_json(path: _PathLike, what: str = "annotation file") -> Any:
    """Parse a json file; a missing file or bad json names the file (and line and column)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except json.JSONDecodeError as e:
        raise DatasetError(
            f"{what} {str(path)!r} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
            "fix the file there or export it again"
        ) from None
    except UnicodeDecodeError as e:
        raise DatasetError(f"{what} {str(path)!r} is not UTF-8 text ({e.reason} at byte {e.start}); is it a json file?") from None


def missing_image_files(file_names: Sequence[str], root: _PathLike) -> List[str]:
    """The names (relative to ``root``) of ``file_names`` that are not files on disk."""
    root = str(root)
    return [f for f in file_names if not os.path.isfile(os.path.join(root, f))]


def raise_missing_images(missing: Sequence[str], total: int, name: str, root: _PathLike, source: str) -> None:
    if missing:
        raise DatasetError(
            f"{name}: {len(missing)} of {total} image files named in {source} are missing under "
            f"{str(root)!r}: {_listing(list(missing))}. Check the image folder of the registration "
            "(and $DETECTRON2_DATASETS) or the file names; tools/check_dataset.py lists every problem"
        )


@dataclass
class CocoData:
    """A COCO json after the checks: ``dataset`` holds only the kept annotations (each with
    ``id``, ``area`` and ``iscrowd``), ready for pycocotools; ``skips`` what was left out."""

    json_file: str
    image_root: str
    dataset: Dict[str, Any]
    skips: Skips
    num_annotations_in_file: int


def _int(value: Any) -> Optional[int]:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def check_coco_json(
    json_file: _PathLike,
    image_root: _PathLike,
    name: Optional[str] = None,
    check_files: bool = True,
    data: Optional[Dict[str, Any]] = None,
) -> CocoData:
    """Read and check a COCO instances json (see the module docstring); skipped annotations are
    counted in the result (the caller reports them with :meth:`Skips.report`)."""
    json_file = str(json_file)
    name = name or os.path.basename(json_file)
    raw = read_json(json_file) if data is None else data
    where = f"{json_file!r}"
    if not isinstance(raw, dict):
        raise DatasetError(f"{where} holds a {type(raw).__name__}, not a COCO instances json (an object with "
                           "'images', 'annotations' and 'categories')")
    for key in ("images", "categories"):
        if not isinstance(raw.get(key), list):
            raise DatasetError(f"{where} has no {key!r} list; a COCO instances json needs 'images', 'annotations' "
                               "and 'categories'")
    annotations = raw.get("annotations", [])
    if annotations is None:
        annotations = []
    if not isinstance(annotations, list):
        raise DatasetError(f"{where}: 'annotations' is a {type(annotations).__name__}, not a list")
    if not raw["categories"]:
        raise DatasetError(f"{where} lists no categories; add one entry {{'id': .., 'name': ..}} per class")

    categories, cat_ids = [], set()
    for i, c in enumerate(raw["categories"]):
        cid = _int(c.get("id")) if isinstance(c, dict) else None
        if cid is None or not isinstance(c.get("name"), str):
            raise DatasetError(f"{where}: categories[{i}] needs an integer 'id' and a 'name', got {c!r}")
        if cid in cat_ids:
            raise DatasetError(f"{where}: category id {cid} is listed twice in 'categories'")
        cat_ids.add(cid)
        categories.append(c)

    images, sizes = [], {}
    bad_images = []
    for i, im in enumerate(raw["images"]):
        iid = _int(im.get("id")) if isinstance(im, dict) else None
        h = _int(im.get("height")) if isinstance(im, dict) else None
        w = _int(im.get("width")) if isinstance(im, dict) else None
        if iid is None or not isinstance(im.get("file_name"), str) or not h or not w or h <= 0 or w <= 0:
            bad_images.append(f"images[{i}]")
            continue
        if iid in sizes:
            raise DatasetError(f"{where}: image id {iid} is listed twice in 'images'")
        sizes[iid] = (w, h)
        images.append(im)
    if bad_images:
        raise DatasetError(
            f"{where}: {len(bad_images)} entries of 'images' lack an integer 'id', a 'file_name' or a positive "
            f"integer 'height' and 'width': {_listing(bad_images)}"
        )

    unknown_cats: Dict[Any, List[Any]] = {}
    skips = Skips(total=len(annotations))
    kept = []
    used_ids = set()
    for i, a in enumerate(annotations):
        if not isinstance(a, dict):
            raise DatasetError(f"{where}: annotations[{i}] is a {type(a).__name__}, not an object")
        ann_id = a.get("id", f"#{i}")
        cat = a.get("category_id")
        if _int(cat) not in cat_ids:
            unknown_cats.setdefault(cat, []).append(ann_id)
            continue
        iid = _int(a.get("image_id"))
        if iid not in sizes:
            skips.add("unknown_image", ann_id)
            continue
        bbox = a.get("bbox")
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
            skips.add("not_finite", ann_id)
            continue
        try:
            x, y, bw, bh = (float(v) for v in bbox)
        except (TypeError, ValueError):
            skips.add("not_finite", ann_id)
            continue
        w, h = sizes[iid]
        reason = check_box([x, y, x + bw, y + bh], w, h)
        if reason:
            skips.add(reason, ann_id)
            continue
        out = dict(a)
        out["image_id"], out["category_id"], out["bbox"] = iid, _int(cat), [x, y, bw, bh]
        out.setdefault("iscrowd", 0)
        if not isinstance(out.get("area"), (int, float)):
            out["area"] = bw * bh
        kept.append(out)
        if isinstance(a.get("id"), int):
            used_ids.add(a["id"])
    if unknown_cats:
        listed = sorted(cat_ids)
        details = "; ".join(f"category_id {c!r}: {len(v)} annotations (ids {_listing(v, 3)})" for c, v in unknown_cats.items())
        raise DatasetError(
            f"{where}: annotations use category ids that 'categories' does not list ({details}); listed ids: "
            f"{_listing(listed, 20)}. Add the missing categories to the json or remove those annotations"
        )
    # unique ids for pycocotools (annotations without one get the next free ids)
    next_id = max(used_ids, default=0) + 1
    seen = set()
    for a in kept:
        if not isinstance(a.get("id"), int) or a["id"] in seen:
            a["id"] = next_id
            next_id += 1
        seen.add(a["id"])

    if check_files:
        missing = missing_image_files([im["file_name"] for im in images], image_root)
        raise_missing_images(missing, len(images), name, image_root, json_file)
    dataset = {k: v for k, v in raw.items() if k not in ("images", "annotations", "categories")}
    dataset.update(images=images, annotations=kept, categories=categories)
    return CocoData(json_file, str(image_root), dataset, skips, len(annotations))


def coco_records(
    data: CocoData, id_map: Dict[int, int]
) -> List[Dict[str, Any]]:
    """The loader's records (see :mod:`tprd.data.datasets`) of every image of a checked json."""
    anns = data.dataset["annotations"]
    by_image: Dict[int, List[Dict[str, Any]]] = {}
    for a in anns:
        by_image.setdefault(a["image_id"], []).append(a)
    root = Path(data.image_root)
    records = []
    for im in sorted(data.dataset["images"], key=lambda m: m["id"]):
        group = by_image.get(im["id"], [])
        box = np.asarray([a["bbox"] for a in group], dtype=np.float64).reshape(-1, 4)
        xyxy = np.concatenate([box[:, :2], box[:, :2] + box[:, 2:]], axis=1).astype(np.float32)
        records.append(
            {
                "file_name": str(root / im["file_name"]),
                "height": int(im["height"]),
                "width": int(im["width"]),
                "image_id": int(im["id"]),
                "boxes": xyxy,
                "classes": np.asarray([id_map[a["category_id"]] for a in group], dtype=np.int64),
                "iscrowd": np.asarray([bool(a.get("iscrowd", 0) or a.get("ignore", 0)) for a in group], dtype=bool),
            }
        )
    return records
