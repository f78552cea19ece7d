"""Named datasets and their metadata (detectron2's DatasetCatalog / MetadataCatalog, minus detectron2).

Two registries, both plain dicts underneath:

* :data:`DatasetCatalog` maps a dataset name to a zero-argument function returning its list of
  raw records (see :mod:`tprd.data.datasets` for the record format);
* :data:`MetadataCatalog` maps a name to a :class:`Metadata`: ``thing_classes``,
  ``thing_dataset_id_to_contiguous_id`` / ``thing_contiguous_id_to_dataset_id``,
  ``evaluator_type`` (``"coco"`` or ``"voc"``) and where the data lives (``json_file`` +
  ``image_root`` for COCO-style sets; ``dirname`` + ``split`` + ``year`` for VOC-style sets).

Built-in names, resolved under ``$DETECTRON2_DATASETS`` (default ``./datasets``) **when they are
used** (so changing the variable takes effect without re-importing), in the detectron2 layout
documented in ``datasets/README.md``:

==========================  ==========================================================
``coco_2017_train``         ``coco/train2017`` + ``coco/annotations/instances_train2017.json``
``coco_2017_val``           ``coco/val2017`` + ``coco/annotations/instances_val2017.json``
``voc_2007_trainval``       ``VOC2007`` (``ImageSets/Main/trainval.txt``)
``voc_2012_trainval``       ``VOC2012`` (``ImageSets/Main/trainval.txt``)
``voc_2007_test``           ``VOC2007_test`` (``ImageSets/Main/test.txt``); falls back to
                            ``VOC2007`` when that folder holds ``ImageSets/Main/test.txt``
``synthetic_train/val``     ``synthetic/annotations/instances_{train,val}.json`` + images
``synthetic_voc_trainval``  ``synthetic/VOC`` (``trainval``) — VOC layout of the same images
``synthetic_voc_test``      ``synthetic/VOC`` (``test``)
``synthetic_bench_train``   ``synthetic_bench/``: the larger benchmark set of
``synthetic_bench_val``     ``tools/distill_benchmark.py`` (:data:`SYNTHETIC_BENCH_PARAMS`:
``synthetic_bench_voc_*``   2000 train / 300 val images), COCO and VOC layouts
                            (``trainval`` / ``test``)
==========================  ==========================================================

The synthetic sets are generated on first use (:func:`tprd.data.synthetic.ensure_synthetic_dataset`).
Any COCO-format json can be added with :func:`register_coco_instances`.

There is deliberately no string-to-class table for anything but datasets: models, mappers and
evaluators are built from configs with ``LazyCall``.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from tprd.errors import DatasetError

__all__ = [
    "DatasetCatalog",
    "MetadataCatalog",
    "Metadata",
    "COCO_CATEGORIES",
    "VOC_CLASSES",
    "datasets_root",
    "register_coco_instances",
    "register_pascal_voc",
    "prepare_dataset",
    "resolve_dataset_names",
    "SYNTHETIC_BENCH_PARAMS",
    "SYNTHETIC_PAPER_PARAMS",
]

logger = logging.getLogger(__name__)

_ENV = "DETECTRON2_DATASETS"

#: The 80 COCO thing categories as ``(dataset category id, name)``, in id order.
COCO_CATEGORIES: Tuple[Tuple[int, str], ...] = (
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"),
    (7, "train"), (8, "truck"), (9, "boat"), (10, "traffic light"), (11, "fire hydrant"),
    (13, "stop sign"), (14, "parking meter"), (15, "bench"), (16, "bird"), (17, "cat"), (18, "dog"),
    (19, "horse"), (20, "sheep"), (21, "cow"), (22, "elephant"), (23, "bear"), (24, "zebra"),
    (25, "giraffe"), (27, "backpack"), (28, "umbrella"), (31, "handbag"), (32, "tie"),
    (33, "suitcase"), (34, "frisbee"), (35, "skis"), (36, "snowboard"), (37, "sports ball"),
    (38, "kite"), (39, "baseball bat"), (40, "baseball glove"), (41, "skateboard"),
    (42, "surfboard"), (43, "tennis racket"), (44, "bottle"), (46, "wine glass"), (47, "cup"),
    (48, "fork"), (49, "knife"), (50, "spoon"), (51, "bowl"), (52, "banana"), (53, "apple"),
    (54, "sandwich"), (55, "orange"), (56, "broccoli"), (57, "carrot"), (58, "hot dog"),
    (59, "pizza"), (60, "donut"), (61, "cake"), (62, "chair"), (63, "couch"), (64, "potted plant"),
    (65, "bed"), (67, "dining table"), (70, "toilet"), (72, "tv"), (73, "laptop"), (74, "mouse"),
    (75, "remote"), (76, "keyboard"), (77, "cell phone"), (78, "microwave"), (79, "oven"),
    (80, "toaster"), (81, "sink"), (82, "refrigerator"), (84, "book"), (85, "clock"), (86, "vase"),
    (87, "scissors"), (88, "teddy bear"), (89, "hair drier"), (90, "toothbrush"),
)

#: The 20 Pascal VOC classes in the standard order (contiguous labels 0..19).
VOC_CLASSES: Tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)


#: Generation parameters of the ``synthetic_bench_*`` datasets (same images and classes as the
#: small ``synthetic_*`` sets, more of them; see :func:`tprd.data.synthetic.generate_synthetic_dataset`).
SYNTHETIC_BENCH_PARAMS: Dict[str, Any] = {"num_train": 2000, "num_val": 300, "seed": 1}
#: Generation parameters of the ``synthetic_paper_*`` datasets: the benchmark's ``paper`` regime
#: (24 classes, cluttered scenes; :func:`tprd.data.synthetic.render_paper_sample`).
SYNTHETIC_PAPER_PARAMS: Dict[str, Any] = {"num_train": 4000, "num_val": 500, "seed": 2, "max_objects": 10,
                                          "style": "paper"}


def datasets_root() -> Path:
    """``$DETECTRON2_DATASETS`` (``~`` expanded), or ``./datasets`` when the variable is unset."""
    return Path(os.path.expanduser(os.environ.get(_ENV, "datasets")))


def _root_hint() -> str:
    value = os.environ.get(_ENV)
    state = f"currently {value!r}" if value is not None else "unset, so the root is ./datasets"
    return f"${_ENV} ({state}); see datasets/README.md"


# --------------------------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------------------------
class Metadata:
    """Attribute bag describing one dataset (detectron2's ``Metadata``).

    Values set with :meth:`set` (or attribute assignment) are stored. Built-in datasets also have
    *dynamic* attributes (paths under ``$DETECTRON2_DATASETS``) that are recomputed on every
    access, and *lazy* attributes (class lists read from a user json) computed once on first
    access. A stored value always wins over a dynamic one.
    """

    def __init__(self, name: str, **kwargs: Any):
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "_dynamic", {})
        object.__setattr__(self, "_lazy", None)
        self.set(**kwargs)

    def set(self, **kwargs: Any) -> "Metadata":
        for k, v in kwargs.items():
            setattr(self, k, v)
        return self

    def __setattr__(self, key: str, value: Any) -> None:
        if key == "name" and getattr(self, "name", value) != value:
            raise AttributeError(f"cannot rename metadata {self.name!r} to {value!r}")
        object.__setattr__(self, key, value)

    def __getattr__(self, key: str) -> Any:
        # Only called for attributes that are not stored.
        if key.startswith("__") or key in ("_dynamic", "_lazy"):
            raise AttributeError(key)
        dynamic = self.__dict__.get("_dynamic", {})
        if key in dynamic:
            return dynamic[key]()
        lazy = self.__dict__.get("_lazy")
        if lazy is not None:
            object.__setattr__(self, "_lazy", None)
            try:
                self.set(**lazy())
            except BaseException:
                object.__setattr__(self, "_lazy", lazy)
                raise
            if key in self.__dict__:
                return self.__dict__[key]
        raise AttributeError(
            f"Metadata of dataset {self.name!r} has no attribute {key!r}; "
            f"available: {sorted(self.as_dict())}"
        )

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return getattr(self, key)
        except AttributeError:
            return default

    def as_dict(self) -> Dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if not k.startswith("_")}
        for k, fn in self.__dict__["_dynamic"].items():
            out.setdefault(k, fn())
        return out

    def __repr__(self) -> str:
        return f"Metadata({', '.join(f'{k}={v!r}' for k, v in self.as_dict().items() if not k.startswith('thing_'))})"


class _MetadataCatalog(dict):
    """``name -> Metadata``; :meth:`get` creates an empty entry on first use (as detectron2)."""

    def get(self, name: str) -> Metadata:  # type: ignore[override]
        if not isinstance(name, str):
            raise TypeError(f"dataset name must be a string, got {type(name).__name__}: {name!r}")
        if name not in self:
            self[name] = Metadata(name)
        return self[name]

    def list(self) -> List[str]:
        return list(self.keys())

    def remove(self, name: str) -> None:
        self.pop(name, None)


class _DatasetCatalog(dict):
    """``name -> function returning the list of raw records`` (detectron2's ``DatasetCatalog``)."""

    def register(self, name: str, func: Callable[[], List[Dict[str, Any]]]) -> None:
        if not callable(func):
            raise TypeError(f"DatasetCatalog.register({name!r}, ...) needs a callable, got {func!r}")
        if name in self:
            raise KeyError(f"dataset {name!r} is already registered; DatasetCatalog.remove({name!r}) first")
        self[name] = func

    def get(self, name: str, strict: bool = False) -> List[Dict[str, Any]]:  # type: ignore[override]
        """The records of ``name`` (loaded and checked, :mod:`tprd.data.checks`; ``strict``: skipped
        annotations are an error). Records loaded ahead by :meth:`preload` are handed out once,
        with the log lines of their loading."""
        if name not in self:
            raise DatasetNotRegisteredError(
                f"dataset {name!r} is not registered. Registered datasets: {', '.join(sorted(self))}. "
                "Add a COCO-format json with tprd.data.register_coco_instances(name, json_file, image_root)."
            )
        preloaded = self._preloaded.pop((name, bool(strict)), None)
        if preloaded is not None:
            records, log_records = preloaded
            for record in log_records:
                logging.getLogger(record.name).handle(record)
            return records
        from .checks import strict_loading

        with strict_loading(strict):
            records = dict.__getitem__(self, name)()
        if not isinstance(records, list):
            raise TypeError(f"the loader of dataset {name!r} returned {type(records).__name__}, expected a list")
        return records

    @property
    def _preloaded(self) -> Dict[Tuple[str, bool], Any]:
        cache = self.__dict__.get("_preload_cache")
        if cache is None:
            cache = self.__dict__["_preload_cache"] = {}
        return cache

    def preload(self, name: str, strict: bool = False) -> List[Dict[str, Any]]:
        """Load and check ``name`` now, before the run's logging is set up (the engine does so for
        every dataset of the config before it writes anything); the next :meth:`get` of it returns
        these records and logs what loading logged."""
        buffer = _BufferHandler()
        data_logger = logging.getLogger("tprd.data")
        previous = data_logger.propagate
        data_logger.addHandler(buffer)
        data_logger.propagate = False
        try:
            records = self.get(name, strict=strict)
        finally:
            data_logger.removeHandler(buffer)
            data_logger.propagate = previous
        self._preloaded[(name, bool(strict))] = (records, buffer.records)
        return records

    def clear_preloaded(self) -> None:
        self._preloaded.clear()

    def list(self) -> List[str]:
        return list(self.keys())

    def remove(self, name: str) -> None:
        self.pop(name, None)
        for key in [k for k in self._preloaded if k[0] == name]:
            self._preloaded.pop(key, None)


class _BufferHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: List[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class DatasetNotRegisteredError(DatasetError, KeyError):
    """A dataset name that is not registered (a ``KeyError`` as before, and a user error)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


DatasetCatalog = _DatasetCatalog()
MetadataCatalog = _MetadataCatalog()


def resolve_dataset_names(names: Union[str, Sequence[str]]) -> List[str]:
    """Normalise a name or a sequence of names (tuple, list, OmegaConf ListConfig) to a list."""
    if isinstance(names, str):
        out = [names]
    else:
        try:
            out = [str(n) for n in names]
        except TypeError:
            raise TypeError(f"dataset names must be a string or a sequence of strings, got {names!r}") from None
    if not out:
        raise ValueError("no dataset name given")
    return out


# --------------------------------------------------------------------------------------------
# Path checks and availability
# --------------------------------------------------------------------------------------------
def _require(path: Path, what: str, name: str, layout: str) -> None:
    if not path.exists():
        raise FileNotFoundError(  # one line: the engine reports it as "error: ..."
            f"Dataset {name!r}: {what} {str(path)!r} does not exist. Expected layout: "
            + "; ".join(part.strip() for part in layout.splitlines())
            + f". Dataset root: {_root_hint()}."
        )


def _coco_layout(meta: Metadata) -> str:
    return (
        f"  {meta.json_file}   (COCO instances json)\n"
        f"  {meta.image_root}/   (the images named in the json's file_name fields)"
    )


def _voc_layout(meta: Metadata) -> str:
    d = meta.dirname
    return (
        f"  {d}/Annotations/<id>.xml\n"
        f"  {d}/ImageSets/Main/{meta.split}.txt\n"
        f"  {d}/JPEGImages/<id>.jpg"
    )


def prepare_dataset(name: str) -> Metadata:
    """Make dataset ``name`` usable and return its metadata.

    Generates the synthetic data if it is missing; for every other dataset checks that the json
    file / folders exist and raises :class:`FileNotFoundError` naming the missing path, the
    expected layout and ``$DETECTRON2_DATASETS`` otherwise.
    """
    if name not in DatasetCatalog:
        DatasetCatalog.get(name)  # raises the "not registered" error listing the known names
    meta = MetadataCatalog.get(name)
    if meta.get("synthetic", False):
        from .synthetic import ensure_synthetic_dataset

        ensure_synthetic_dataset(Path(meta.synthetic_root), **dict(meta.get("synthetic_params", {}) or {}))
    etype = meta.get("evaluator_type")
    if etype == "coco":
        layout = _coco_layout(meta)
        _require(Path(meta.json_file), "annotation file", name, layout)
        _require(Path(meta.image_root), "image folder", name, layout)
    elif etype == "voc":
        layout = _voc_layout(meta)
        d = Path(meta.dirname)
        _require(d, "folder", name, layout)
        _require(d / "ImageSets" / "Main" / f"{meta.split}.txt", "split file", name, layout)
        _require(d / "Annotations", "annotation folder", name, layout)
        _require(d / "JPEGImages", "image folder", name, layout)
    return meta


# --------------------------------------------------------------------------------------------
# COCO-format datasets
# --------------------------------------------------------------------------------------------
def _coco_meta_from_json(json_file: Union[str, Path]) -> Dict[str, Any]:
    """Class names and id mappings from a COCO json's ``categories`` (sorted by id, detectron2)."""
    from .checks import check_coco_json

    if not Path(json_file).is_file():
        raise FileNotFoundError(
            f"COCO annotation file {str(json_file)!r} does not exist (needed for its categories). "
            f"Dataset root: {_root_hint()}; a registration with a relative path is taken from {os.getcwd()}"
        )
    # the same checks as loading (without looking for the image files): a broken json is one message
    data = check_coco_json(json_file, "", check_files=False)
    return _coco_meta_from_categories([(int(c["id"]), str(c["name"])) for c in data.dataset["categories"]])


def _coco_meta_from_categories(cats: Sequence[Tuple[int, str]]) -> Dict[str, Any]:
    cats = sorted(cats)
    ids = [c[0] for c in cats]
    return {
        "thing_classes": [c[1] for c in cats],
        "thing_dataset_id_to_contiguous_id": {cid: i for i, cid in enumerate(ids)},
        "thing_contiguous_id_to_dataset_id": {i: cid for i, cid in enumerate(ids)},
    }


def _coco_loader(name: str) -> Callable[[], List[Dict[str, Any]]]:
    def load() -> List[Dict[str, Any]]:
        from .datasets import load_coco_json

        meta = prepare_dataset(name)
        return load_coco_json(meta.json_file, meta.image_root, metadata=meta)

    return load


def register_coco_instances(
    name: str,
    json_file: Union[str, os.PathLike],
    image_root: Union[str, os.PathLike],
    metadata: Optional[Dict[str, Any]] = None,
) -> None:
    """Register a COCO-format instances json as dataset ``name`` (detectron2's function).

    ``thing_classes`` and the category-id mappings are read from the json's ``categories`` on
    first use (sorted by id; contiguous labels ``0..C-1``), unless given in ``metadata``.
    Evaluation uses :class:`tprd.evaluation.COCOEvaluator`.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"dataset name must be a non-empty string, got {name!r}")
    DatasetCatalog.register(name, _coco_loader(name))
    meta = MetadataCatalog.get(name)
    meta.set(json_file=str(json_file), image_root=str(image_root), evaluator_type="coco", **(metadata or {}))
    if "thing_classes" not in (metadata or {}):
        jf = str(json_file)
        object.__setattr__(meta, "_lazy", lambda: _coco_meta_from_json(jf))


def register_pascal_voc(
    name: str,
    dirname: Union[str, os.PathLike],
    split: str,
    year: int = 2007,
    class_names: Sequence[str] = VOC_CLASSES,
) -> None:
    """Register a Pascal-VOC-layout folder (``Annotations``, ``ImageSets/Main``, ``JPEGImages``).

    ``year == 2007`` makes :class:`tprd.evaluation.PascalVOCDetectionEvaluator` use the 11-point
    AP of the VOC2007 devkit; any other year uses the area under the precision envelope.
    """
    DatasetCatalog.register(name, _voc_loader(name))
    MetadataCatalog.get(name).set(
        dirname=str(dirname), split=split, year=int(year), evaluator_type="voc", **_voc_meta(class_names)
    )


# --------------------------------------------------------------------------------------------
# VOC-format datasets
# --------------------------------------------------------------------------------------------
def _voc_meta(class_names: Sequence[str]) -> Dict[str, Any]:
    n = len(class_names)
    return {
        "thing_classes": list(class_names),
        # VOC has no separate category ids: the dataset id is the class index.
        "thing_dataset_id_to_contiguous_id": {i: i for i in range(n)},
        "thing_contiguous_id_to_dataset_id": {i: i for i in range(n)},
    }


def _voc_loader(name: str) -> Callable[[], List[Dict[str, Any]]]:
    def load() -> List[Dict[str, Any]]:
        from .datasets import load_voc_instances

        meta = prepare_dataset(name)
        return load_voc_instances(meta.dirname, meta.split, meta.thing_classes, dataset_name=name)

    return load


def _voc2007_test_dir() -> str:
    root = datasets_root()
    primary = root / "VOC2007_test"
    alt = root / "VOC2007"
    if not primary.exists() and (alt / "ImageSets" / "Main" / "test.txt").is_file():
        return str(alt)
    return str(primary)


# --------------------------------------------------------------------------------------------
# Built-in registrations
# --------------------------------------------------------------------------------------------
def _register_builtin_coco(name: str, image_dir: str, json_rel: str, **extra: Any) -> None:
    DatasetCatalog.register(name, _coco_loader(name))
    meta = MetadataCatalog.get(name)
    meta.set(evaluator_type="coco", **extra)
    meta._dynamic["json_file"] = lambda: str(datasets_root() / json_rel)
    meta._dynamic["image_root"] = lambda: str(datasets_root() / image_dir)


def _register_builtin_voc(name: str, dirname: Callable[[], str], split: str, year: int, **extra: Any) -> None:
    DatasetCatalog.register(name, _voc_loader(name))
    meta = MetadataCatalog.get(name)
    meta.set(split=split, year=year, evaluator_type="voc", **_voc_meta(VOC_CLASSES), **extra)
    meta._dynamic["dirname"] = dirname


def _register_all_builtin() -> None:
    coco_meta = _coco_meta_from_categories(COCO_CATEGORIES)
    for split in ("train", "val"):
        _register_builtin_coco(
            f"coco_2017_{split}", f"coco/{split}2017", f"coco/annotations/instances_{split}2017.json", **coco_meta
        )
    _register_builtin_voc("voc_2007_trainval", lambda: str(datasets_root() / "VOC2007"), "trainval", 2007)
    _register_builtin_voc("voc_2012_trainval", lambda: str(datasets_root() / "VOC2012"), "trainval", 2012)
    _register_builtin_voc("voc_2007_test", _voc2007_test_dir, "test", 2007)

    from .synthetic import STYLE_CLASSES, style_categories

    # synthetic_*: the small pipeline-check set (64/16 images); synthetic_bench_*: the benchmark set;
    # synthetic_paper_*: the benchmark's paper regime (24 classes).
    for prefix, folder, params in (("synthetic", "synthetic", {}), ("synthetic_bench", "synthetic_bench", SYNTHETIC_BENCH_PARAMS),
                                   ("synthetic_paper", "synthetic_paper", SYNTHETIC_PAPER_PARAMS)):
        style = params.get("style", "shapes")
        syn_meta = _coco_meta_from_categories([(c["id"], c["name"]) for c in style_categories(style)])
        root = lambda folder=folder: str(datasets_root() / folder)  # noqa: E731
        for split in ("train", "val"):
            name = f"{prefix}_{split}"
            _register_builtin_coco(
                name, f"{folder}/{split}", f"{folder}/annotations/instances_{split}.json",
                synthetic=True, synthetic_params=dict(params), **syn_meta,
            )
            MetadataCatalog.get(name)._dynamic["synthetic_root"] = root
        # The VOC copy of the images; year 2007 => evaluated like voc_2007_test (11-point AP).
        for split in ("trainval", "test"):
            name = f"{prefix}_voc_{split}"
            DatasetCatalog.register(name, _voc_loader(name))
            meta = MetadataCatalog.get(name)
            meta.set(split=split, year=2007, evaluator_type="voc", synthetic=True, synthetic_params=dict(params),
                     **_voc_meta(STYLE_CLASSES[style]))
            meta._dynamic["dirname"] = lambda folder=folder: str(datasets_root() / folder / "VOC")
            meta._dynamic["synthetic_root"] = root


_register_all_builtin()
