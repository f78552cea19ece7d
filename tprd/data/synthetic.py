"""Synthetic shape-detection dataset in COCO and Pascal VOC layouts (no download needed).

Every test and CPU demo run of the toolbox uses this data. An image holds 1..``max_objects``
shapes of five classes (:data:`SYNTHETIC_CLASSES`) with random sizes (from a few pixels to about
60% of the short side), colours, aspect ratios, rotations and some overlap. The background is a
smooth random colour gradient with a few distractor lines and pixel noise, so detection is not
trivial but can be learned.

Layout written by :func:`generate_synthetic_dataset` under ``root``::

    root/
      annotations/instances_train.json   COCO json of the train split
      annotations/instances_val.json     COCO json of the val split
      train/000001.jpg ...                train images
      val/000065.jpg ...                  val images
      VOC/Annotations/000001.xml ...      Pascal VOC xml, one per image (train and val)
      VOC/ImageSets/Main/trainval.txt     ids of the train images
      VOC/ImageSets/Main/test.txt         ids of the val images
      VOC/JPEGImages/000001.jpg ...       the same JPEG bytes as train/ and val/
      synthetic_meta.json                 parameters and counts; written last (completion marker)

Box conventions (one tight box per object, computed from the visible pixels of its mask; pixel
``i`` covers the continuous interval ``[i, i + 1)``): if the visible pixels of an object span
columns ``c0..c1`` and rows ``r0..r1`` (0-based, inclusive), then

* COCO ``bbox = [c0, r0, c1 - c0 + 1, r1 - r0 + 1]`` (floats, ``[x, y, w, h]``), ``area = w * h``;
* VOC ``xmin = c0 + 1, ymin = r0 + 1, xmax = c1 + 1, ymax = r1 + 1`` (integers, 1-based inclusive
  pixel indices, as in the original VOC devkit).

So ``VOC (xmin - 1, ymin - 1, xmax, ymax)`` equals COCO ``(x, y, x + w, y + h)`` exactly, which
is what the detectron2 VOC loader computes (it subtracts 1 from ``xmin`` and ``ymin`` only).

COCO category ids are ``1..5`` in the order of :data:`SYNTHETIC_CLASSES`; contiguous training
labels are ``0..4``, so ``category_id != label`` (code must map through the categories).
Image ids are global: train images are ``1..num_train`` and val images follow, so every VOC
file stem (``f"{image_id:06d}"``) is unique.

Generation is deterministic: image ``i`` of a split is drawn from
``numpy.random.default_rng((seed, split_code, i))`` and saved as JPEG with fixed settings, so
the same seed gives byte-identical files (on the same Pillow/libjpeg build), and the first
``k`` images do not depend on the requested number of images.
"""
from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw

from tprd.progress import progress_bar

__all__ = [
    "SYNTHETIC_CLASSES",
    "SYNTHETIC_CATEGORIES",
    "META_FILENAME",
    "render_synthetic_sample",
    "render_paper_sample",
    "PAPER_CLASSES",
    "STYLE_CLASSES",
    "style_categories",
    "generate_synthetic_dataset",
    "ensure_synthetic_dataset",
    "synthetic_dataset_root",
    "load_synthetic_meta",
]

SYNTHETIC_CLASSES: Tuple[str, ...] = ("circle", "square", "triangle", "bar", "ring")
#: COCO ``categories`` entries; ids start at 1 (``id = label + 1``).
SYNTHETIC_CATEGORIES: Tuple[Dict[str, Any], ...] = tuple(
    {"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(SYNTHETIC_CLASSES)
)
#: The "paper" style (:func:`render_paper_sample`): six shapes in four colour families, every
#: (colour, shape) pair a class -- 24 classes, so that colour *and* shape must be recognised.
PAPER_SHAPES: Tuple[str, ...] = ("circle", "square", "triangle", "bar", "ring", "cross")
#: colour family -> hue in degrees (HSV); an object's hue is drawn within +-12 degrees of it.
PAPER_COLOURS: Dict[str, float] = {"red": 0.0, "yellow": 55.0, "green": 120.0, "blue": 225.0}
PAPER_CLASSES: Tuple[str, ...] = tuple(f"{c}_{s}" for c in PAPER_COLOURS for s in PAPER_SHAPES)
#: ``style`` -> class names (contiguous labels in this order; COCO category id = label + 1)
STYLE_CLASSES: Dict[str, Tuple[str, ...]] = {"shapes": SYNTHETIC_CLASSES, "paper": PAPER_CLASSES}
META_FILENAME = "synthetic_meta.json"
FORMAT_VERSION = 1
JPEG_QUALITY = 95
_SPLIT_CODES = {"train": 0, "val": 1}
_MANAGED_ENTRIES = ("annotations", "train", "val", "VOC")  # what this module writes (besides meta)
_INCOMPLETE_MARKER = ".synthetic_incomplete"
_PathLike = Union[str, os.PathLike]


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------
def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Smooth random colour gradient (upsampled coarse grid) plus distractor lines, float HxWx3."""
    gh, gw = int(rng.integers(2, 5)), int(rng.integers(2, 5))
    base = rng.uniform(70.0, 180.0, size=3)
    grid = base[None, None, :] + rng.uniform(-45.0, 45.0, size=(gh, gw, 3))
    grid = np.clip(grid, 0, 255).astype(np.uint8)
    bg = Image.fromarray(grid, "RGB").resize((w, h), Image.BILINEAR)
    draw = ImageDraw.Draw(bg)
    for _ in range(int(rng.integers(2, 7))):
        x0, x1 = rng.uniform(-0.2 * w, 1.2 * w, size=2)
        y0, y1 = rng.uniform(-0.2 * h, 1.2 * h, size=2)
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        draw.line([(float(x0), float(y0)), (float(x1), float(y1))], fill=colour, width=int(rng.integers(1, 3)))
    return np.asarray(bg, dtype=np.float32)


def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return points @ np.array([[c, s], [-s, c]], dtype=np.float64)


def _shape_mask(rng: np.random.Generator, name: str, h: int, w: int, min_frac: float = 0.06,
                min_px: float = 6.0) -> np.ndarray:
    """Draw one shape ``name`` fully inside an ``h x w`` canvas; return a bool mask. Its size is
    log-uniform between ``max(min_px, min_frac * short side)`` and 60% of the short side."""
    short = min(h, w)
    lo, hi = max(min_px, min_frac * short), 0.6 * short
    size = float(math.exp(rng.uniform(math.log(lo), math.log(hi))))  # log-uniform: many small ones
    if name == "bar":
        length = max(size, 12.0)
        thick = max(3.0, length / rng.uniform(3.0, 6.0))
        half = np.array([length, thick]) / 2.0
        if rng.random() < 0.5:
            half = half[::-1]
        angle = rng.uniform(-0.25, 0.25)
    elif name == "square":
        aspect = rng.uniform(0.75, 1.33)
        half = np.array([size * math.sqrt(aspect), size / math.sqrt(aspect)]) / 2.0
        angle = rng.uniform(-0.35, 0.35)
    elif name == "triangle":
        aspect = rng.uniform(0.7, 1.4)
        half = np.array([size * math.sqrt(aspect), size / math.sqrt(aspect)]) / 2.0
        angle = rng.uniform(-math.pi, math.pi)
    elif name == "cross":  # a plus sign: two bars of relative thickness t through the centre
        half = np.array([size, size]) / 2.0
        thick = rng.uniform(0.28, 0.45)
        angle = rng.uniform(-0.35, 0.35)
    else:  # circle / ring: ellipses, mildly elongated
        aspect = rng.uniform(0.75, 1.33)
        half = np.array([size * math.sqrt(aspect), size / math.sqrt(aspect)]) / 2.0
        angle = 0.0
        if name == "ring":
            half = np.maximum(half, 4.0)

    if name in ("bar", "square"):
        pts = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64) * half
        pts = _rotate(pts, angle)
    elif name == "triangle":
        apex = rng.uniform(-0.6, 0.6)
        pts = np.array([[apex, -1.0], [1.0, 1.0], [-1.0, 1.0]], dtype=np.float64) * half
        pts = _rotate(pts, angle)
    elif name == "cross":
        t = thick
        unit = [[-t, -1], [t, -1], [t, -t], [1, -t], [1, t], [t, t], [t, 1], [-t, 1], [-t, t], [-1, t], [-1, -t], [-t, -t]]
        pts = _rotate(np.array(unit, dtype=np.float64) * half, angle)
    else:
        pts = np.array([[-1, -1], [1, 1]], dtype=np.float64) * half
    ext_lo, ext_hi = pts.min(axis=0), pts.max(axis=0)
    # Centre so that the whole shape lies inside the image (one pixel of margin).
    cx = rng.uniform(1.0 - ext_lo[0], max(1.0 - ext_lo[0], w - 2.0 - ext_hi[0]))
    cy = rng.uniform(1.0 - ext_lo[1], max(1.0 - ext_lo[1], h - 2.0 - ext_hi[1]))
    pts = pts + np.array([cx, cy])

    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    if name in ("circle", "ring"):
        box = [float(pts[0, 0]), float(pts[0, 1]), float(pts[1, 0]), float(pts[1, 1])]
        if name == "ring":
            width = max(2, int(round(min(half) * rng.uniform(0.25, 0.45))))
            draw.ellipse(box, outline=255, width=width)
        else:
            draw.ellipse(box, fill=255)
    else:
        draw.polygon([(float(x), float(y)) for x, y in pts], fill=255)
    mask = np.asarray(canvas) > 0
    return mask[:h, :w]


def _most_distant_colour(draw: Callable[[], np.ndarray], bg_mean: np.ndarray) -> Tuple[np.ndarray, float]:
    """Of up to 8 colours ``draw()`` (stopping at the first at least 150 away), the most distant
    from ``bg_mean`` (L1 over RGB), and its distance."""
    best, best_dist = None, -1.0
    for _ in range(8):
        colour = draw()
        dist = float(np.abs(colour - bg_mean).sum())
        if dist > best_dist:
            best, best_dist = colour, dist
        if dist >= 150.0:
            break
    assert best is not None
    return best, best_dist


def _object_colour(rng: np.random.Generator, bg_mean: np.ndarray) -> np.ndarray:
    """A saturated colour that differs clearly from the local background mean."""

    def draw() -> np.ndarray:
        hue = rng.uniform(0.0, 6.0)
        sat, val = rng.uniform(0.55, 1.0), rng.uniform(0.35, 1.0)
        k = np.array([5.0, 3.0, 1.0]) + hue
        rgb = val * (1.0 - sat * np.clip(np.minimum(k % 6.0, 4.0 - k % 6.0), 0.0, 1.0))
        return 255.0 * rgb

    best, best_dist = _most_distant_colour(draw, bg_mean)
    if best_dist < 120.0:  # fall back to the complementary grey level of the background
        best = np.full(3, 235.0 if bg_mean.mean() < 128 else 20.0)
    return best


def render_synthetic_sample(
    rng: np.random.Generator, image_size: Sequence[int] = (128, 160), max_objects: int = 5
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render one image.

    Returns ``(image, boxes, labels)``: ``image`` uint8 ``H x W x 3`` RGB; ``boxes`` float32
    ``N x 4`` tight ``(x0, y0, x1, y1)`` in continuous pixel coordinates (``x1 = last column + 1``);
    ``labels`` int64 ``N`` contiguous class indices into :data:`SYNTHETIC_CLASSES` (0-based).
    ``N >= 1``. Later objects may partly occlude earlier ones; boxes cover the visible pixels.
    """
    h, w = int(image_size[0]), int(image_size[1])
    img = _background(rng, h, w)
    n_target = int(rng.integers(1, max_objects + 1))
    visible: List[np.ndarray] = []
    labels: List[int] = []
    for _ in range(n_target):
        for _attempt in range(20):
            label = int(rng.integers(0, len(SYNTHETIC_CLASSES)))
            mask = _shape_mask(rng, SYNTHETIC_CLASSES[label], h, w)
            if mask.sum() < 12:
                continue
            # Accept only moderate occlusion: each earlier object keeps >= 65% of its visible
            # pixels (and at least 12), so every annotation stays recognisable.
            ok = True
            for m in visible:
                kept = int((m & ~mask).sum())
                if kept < 12 or kept < 0.65 * int(m.sum()):
                    ok = False
                    break
            if not ok:
                continue
            colour = _object_colour(rng, img[mask].mean(axis=0))
            visible = _add_object(rng, img, mask, colour, 0.3, visible)
            labels.append(label)
            break
    return _finish(rng, img, visible, labels)


def _add_object(rng: np.random.Generator, img: np.ndarray, mask: np.ndarray, colour: np.ndarray, shading: float,
                visible: List[np.ndarray]) -> List[np.ndarray]:
    """Paint an object on top (:func:`_paint`): the visible masks of the objects under it lose
    ``mask``, which is added last."""
    _paint(rng, img, mask, colour, shading)
    return [m & ~mask for m in visible] + [mask]


def _paint(rng: np.random.Generator, img: np.ndarray, mask: np.ndarray, colour: np.ndarray, shading: float) -> None:
    """Paint ``colour`` into ``img`` where ``mask``, with a gentle linear shading across the object
    (a random direction, up to ``shading`` relative) for some texture."""
    h, w = mask.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    theta = rng.uniform(0.0, 2.0 * math.pi)
    ramp = (math.cos(theta) * xx + math.sin(theta) * yy) / max(h, w)
    shade = 1.0 + rng.uniform(0.0, shading) * (ramp - ramp[mask].mean())
    img[mask] = np.clip(colour[None, :] * shade[mask][:, None], 0.0, 255.0)


def _finish(rng: np.random.Generator, img: np.ndarray, visible: List[np.ndarray], labels: List[int]):
    """Pixel noise, uint8 image, and each object's tight box of its visible pixels."""
    img = img + rng.normal(0.0, 6.0, size=img.shape).astype(np.float32)
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    boxes = np.zeros((len(visible), 4), dtype=np.float32)
    for i, m in enumerate(visible):
        rows, cols = np.nonzero(m.any(axis=1))[0], np.nonzero(m.any(axis=0))[0]
        boxes[i] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
    return image, boxes, np.asarray(labels, dtype=np.int64)


def _hsv_colour(hue_deg: float, sat: float, val: float) -> np.ndarray:
    """RGB in 0..255 of an HSV colour (hue in degrees)."""
    k = (np.array([5.0, 3.0, 1.0]) + hue_deg / 60.0) % 6.0
    return 255.0 * val * (1.0 - sat * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0))


def _family_colour(rng: np.random.Generator, family: str, bg_mean: np.ndarray) -> np.ndarray:
    """A colour of ``family`` (hue within +-12 degrees, saturated) that stands out from the local
    background: the most distant of up to 8 draws."""

    def draw() -> np.ndarray:
        hue = PAPER_COLOURS[family] + rng.uniform(-12.0, 12.0)
        return _hsv_colour(hue, rng.uniform(0.65, 1.0), rng.uniform(0.62, 1.0))

    return _most_distant_colour(draw, bg_mean)[0]


def render_paper_sample(
    rng: np.random.Generator, image_size: Sequence[int] = (128, 160), max_objects: int = 10
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render one image of the ``paper`` style: cluttered scenes of 24 classes.

    Like :func:`render_synthetic_sample` (same return values; labels index :data:`PAPER_CLASSES`),
    but with 2..``max_objects`` objects whose class is a (colour family, shape) pair, on a less
    saturated background with distractor lines and 0..4 unannotated achromatic (grey) shapes
    underneath, which a detector must learn to ignore. Objects are at least 8 px (7% of the short
    side) so that colour and shape stay recognisable; occlusion is moderate as in the shapes style.
    """
    h, w = int(image_size[0]), int(image_size[1])
    img = _background(rng, h, w)
    grey = img.mean(axis=2, keepdims=True)
    img = 0.5 * img + 0.5 * grey  # halve the background's saturation: colour belongs to objects
    for _ in range(int(rng.integers(0, 5))):  # distractors: grey shapes, drawn first
        mask = _shape_mask(rng, PAPER_SHAPES[int(rng.integers(0, len(PAPER_SHAPES)))], h, w, 0.07, 8.0)
        level = float(rng.uniform(0.0, 255.0))
        img[mask] = level
    n_target = int(rng.integers(2, max(2, max_objects) + 1))
    visible: List[np.ndarray] = []
    labels: List[int] = []
    colours = list(PAPER_COLOURS)
    for _ in range(n_target):
        for _attempt in range(20):
            label = int(rng.integers(0, len(PAPER_CLASSES)))
            family, shape = colours[label // len(PAPER_SHAPES)], PAPER_SHAPES[label % len(PAPER_SHAPES)]
            mask = _shape_mask(rng, shape, h, w, 0.07, 8.0)
            if mask.sum() < 16:
                continue
            ok = all(
                int((m & ~mask).sum()) >= max(16, 0.65 * int(m.sum())) for m in visible
            )
            if not ok:
                continue
            colour = _family_colour(rng, family, img[mask].mean(axis=0))
            visible = _add_object(rng, img, mask, colour, 0.25, visible)
            labels.append(label)
            break
    return _finish(rng, img, visible, labels)


#: ``style`` -> name of its renderer in this module (looked up at call time)
_RENDERERS = {"shapes": "render_synthetic_sample", "paper": "render_paper_sample"}


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------
def _jpeg_bytes(image: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(image, "RGB").save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0, optimize=False)
    return buf.getvalue()


def _voc_xml(file_name: str, h: int, w: int, boxes: np.ndarray, labels: np.ndarray,
             classes: Sequence[str] = SYNTHETIC_CLASSES) -> bytes:
    ann = ET.Element("annotation")
    ET.SubElement(ann, "folder").text = "VOC"
    ET.SubElement(ann, "filename").text = file_name
    source = ET.SubElement(ann, "source")
    ET.SubElement(source, "database").text = "TPRD synthetic shapes"
    size = ET.SubElement(ann, "size")
    ET.SubElement(size, "width").text = str(w)
    ET.SubElement(size, "height").text = str(h)
    ET.SubElement(size, "depth").text = "3"
    ET.SubElement(ann, "segmented").text = "0"
    for box, label in zip(boxes, labels):
        obj = ET.SubElement(ann, "object")
        ET.SubElement(obj, "name").text = classes[int(label)]
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = "0"
        ET.SubElement(obj, "difficult").text = "0"
        bnd = ET.SubElement(obj, "bndbox")
        x0, y0, x1, y1 = (int(round(float(v))) for v in box)
        # 1-based inclusive pixel indices: first pixel c0 -> c0 + 1, last pixel x1 - 1 -> x1.
        for tag, val in (("xmin", x0 + 1), ("ymin", y0 + 1), ("xmax", x1), ("ymax", y1)):
            ET.SubElement(bnd, tag).text = str(val)
    ET.indent(ann, space="  ")
    return ET.tostring(ann, encoding="utf-8") + b"\n"


def style_categories(style: str = "shapes") -> List[Dict[str, Any]]:
    """COCO ``categories`` of a style: ids ``1..C`` in the order of its classes."""
    return [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(STYLE_CLASSES[style])]


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def _params(num_train: int, num_val: int, seed: int, image_size: Sequence[int], max_objects: int,
            style: str = "shapes") -> Dict[str, Any]:
    extra = {} if style == "shapes" else {"style": style}  # the shapes style's meta predates styles
    return {**extra,
        "format_version": FORMAT_VERSION,
        "seed": int(seed),
        "num_train": int(num_train),
        "num_val": int(num_val),
        "image_size": [int(image_size[0]), int(image_size[1])],
        "max_objects": int(max_objects),
        "classes": list(STYLE_CLASSES[style]),
        "jpeg_quality": JPEG_QUALITY,
    }


def _generate_into(out: Path, params: Dict[str, Any]) -> Dict[str, Any]:
    """Write the whole dataset into the (empty) directory ``out``; meta file last."""
    voc = out / "VOC"
    for d in (out / "annotations", out / "train", out / "val", voc / "Annotations", voc / "ImageSets" / "Main", voc / "JPEGImages"):
        d.mkdir(parents=True, exist_ok=True)
    counts: Dict[str, int] = {}
    next_image_id, next_ann_id = 1, 1
    with progress_bar(params["num_train"] + params["num_val"], "synthetic dataset", unit="img") as bar:
        for split, voc_set in (("train", "trainval"), ("val", "test")):
            next_image_id, next_ann_id = _generate_split(out, params, split, voc_set, next_image_id, next_ann_id,
                                                         counts, bar)
    meta = dict(params, num_annotations=counts)
    _write_json(out / META_FILENAME, meta)
    return meta


def _generate_split(out: Path, params: Dict[str, Any], split: str, voc_set: str, next_image_id: int,
                    next_ann_id: int, counts: Dict[str, int], bar: Any) -> Tuple[int, int]:
    """Write the images, COCO json and VOC files of one split; returns the next image / box ids."""
    h, w = params["image_size"]
    style = params.get("style", "shapes")
    classes, render = STYLE_CLASSES[style], globals()[_RENDERERS[style]]
    voc = out / "VOC"
    images, annotations, ids = [], [], []
    for i in range(params[f"num_{split}"]):
        rng = np.random.default_rng((params["seed"], _SPLIT_CODES[split], i))
        image, boxes, labels = render(rng, (h, w), params["max_objects"])
        image_id = next_image_id
        next_image_id += 1
        stem = f"{image_id:06d}"
        file_name = stem + ".jpg"
        data = _jpeg_bytes(image)
        (out / split / file_name).write_bytes(data)
        (voc / "JPEGImages" / file_name).write_bytes(data)
        (voc / "Annotations" / (stem + ".xml")).write_bytes(_voc_xml(file_name, h, w, boxes, labels, classes))
        ids.append(stem)
        bar.update(1)
        images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
        for box, label in zip(boxes.tolist(), labels.tolist()):
            bw, bh = box[2] - box[0], box[3] - box[1]
            annotations.append(
                {
                    "id": next_ann_id,
                    "image_id": image_id,
                    "category_id": label + 1,
                    "bbox": [float(box[0]), float(box[1]), float(bw), float(bh)],
                    "area": float(bw * bh),
                    "iscrowd": 0,
                }
            )
            next_ann_id += 1
    coco = {
        "info": {"description": f"TPRD synthetic shapes ({split})", "version": str(FORMAT_VERSION)},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": style_categories(style),
    }
    _write_json(out / "annotations" / f"instances_{split}.json", coco)
    (voc / "ImageSets" / "Main" / f"{voc_set}.txt").write_text("".join(s + "\n" for s in ids))
    counts[split] = len(annotations)
    return next_image_id, next_ann_id


def load_synthetic_meta(root: _PathLike) -> Optional[Dict[str, Any]]:
    """The meta dict of a complete dataset at ``root``, else ``None`` (missing or interrupted)."""
    root = Path(root)
    try:
        meta = json.loads((root / META_FILENAME).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        return None
    if (root / _INCOMPLETE_MARKER).exists():
        return None
    needed = [root / "annotations" / "instances_train.json", root / "annotations" / "instances_val.json"]
    needed += [root / "VOC" / "ImageSets" / "Main" / n for n in ("trainval.txt", "test.txt")]
    if not all(p.is_file() for p in needed):
        return None
    return meta


def _looks_synthetic(root: Path) -> bool:
    """Whether ``root`` may be (re)generated without ``overwrite``: empty, marked as ours, or
    holding nothing but the entries this module writes (e.g. a dataset whose meta is missing)."""
    names = {p.name for p in root.iterdir()}
    if META_FILENAME in names or _INCOMPLETE_MARKER in names:
        return True
    return names <= set(_MANAGED_ENTRIES)


def _summary(root: Path, meta: Dict[str, Any], generated: bool) -> Dict[str, Any]:
    voc = root / "VOC"
    return {
        "root": str(root),
        "generated": generated,
        "coco": {
            split: {"json_file": str(root / "annotations" / f"instances_{split}.json"), "image_root": str(root / split)}
            for split in ("train", "val")
        },
        "voc": {"root": str(voc), "train_split": "trainval", "val_split": "test"},
        "classes": list(meta["classes"]),
        "num_images": {"train": meta["num_train"], "val": meta["num_val"]},
        "num_annotations": dict(meta["num_annotations"]),
        "meta": meta,
    }


def _check_args(num_train: int, num_val: int, seed: int, image_size: Sequence[int], max_objects: int,
                style: str = "shapes") -> None:
    if style not in STYLE_CLASSES:
        raise ValueError(f"style must be one of {sorted(STYLE_CLASSES)}, got {style!r}")
    if int(num_train) < 0 or int(num_val) < 0:
        raise ValueError("num_train and num_val must be >= 0")
    if int(seed) < 0:
        raise ValueError("seed must be >= 0")
    if len(image_size) != 2 or min(int(s) for s in image_size) < 32:
        raise ValueError(f"image_size must be (H, W) with both >= 32, got {image_size!r}")
    if int(max_objects) < 1:
        raise ValueError("max_objects must be >= 1")


def _new_sibling_dir(root: Path) -> Path:
    """A new hidden folder next to ``root`` with the umask's permissions (``mkdtemp`` gives 0700,
    which the renamed dataset would keep)."""
    while True:
        tmp = root.parent / f".{root.name}.tmp-{secrets.token_hex(4)}"
        try:
            tmp.mkdir()
            return tmp
        except FileExistsError:  # pragma: no cover - 32 random bits collided
            continue


def generate_synthetic_dataset(
    root: _PathLike,
    num_train: int = 64,
    num_val: int = 16,
    seed: int = 0,
    image_size: Sequence[int] = (128, 160),
    max_objects: int = 5,
    overwrite: bool = False,
    style: str = "shapes",
) -> Dict[str, Any]:
    """Generate the synthetic dataset under ``root`` (see the module docstring for the layout).

    Idempotent: when ``root`` already holds a complete dataset whose ``synthetic_meta.json``
    matches the parameters, nothing is written (``summary["generated"] is False``) unless
    ``overwrite``. Files are generated in a temporary sibling directory that is renamed into
    place, and the meta file is always written last, so an interrupted run is never taken for a
    complete dataset. When ``root`` holds a different or incomplete synthetic dataset it is
    replaced (only the entries this function writes are touched). A ``root`` holding other
    entries and no meta file is refused unless ``overwrite`` (which then replaces only this
    function's entries and keeps the others).

    Returns a summary dict: ``root``, ``generated``, ``coco`` (per split ``json_file`` and
    ``image_root``), ``voc`` (``root``, ``train_split``, ``val_split``), ``classes``,
    ``num_images``, ``num_annotations`` (per split) and ``meta``.

    ``style`` chooses the images and classes: ``"shapes"`` (:func:`render_synthetic_sample`, five
    classes) or ``"paper"`` (:func:`render_paper_sample`, 24 classes in cluttered scenes).
    """
    _check_args(num_train, num_val, seed, image_size, max_objects, style)
    root = Path(root)
    params = _params(num_train, num_val, seed, image_size, max_objects, style)
    meta = load_synthetic_meta(root)
    if meta is not None and not overwrite and all(meta.get(k) == v for k, v in params.items()):
        return _summary(root, meta, generated=False)
    if root.exists() and not overwrite and not _looks_synthetic(root):
        raise FileExistsError(
            f"{root} is not empty and is not a synthetic dataset (no {META_FILENAME}, other entries); "
            f"pass overwrite=True to replace {', '.join(_MANAGED_ENTRIES)} in it"
        )

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_sibling_dir(root)
    try:
        meta = _generate_into(tmp, params)
        try:
            # Fresh root (or an empty leftover directory): one atomic rename.
            if root.exists() and not any(root.iterdir()):
                root.rmdir()
            os.rename(tmp, root)
            return _summary(root, meta, generated=True)
        except OSError:
            if not root.exists():
                raise
        # root exists with content: swap our entries in, marked incomplete while doing so.
        concurrent = load_synthetic_meta(root)
        if concurrent is not None and not overwrite and all(concurrent.get(k) == v for k, v in params.items()):
            return _summary(root, concurrent, generated=False)  # another process finished first
        (root / _INCOMPLETE_MARKER).write_text("generation in progress\n")
        (root / META_FILENAME).unlink(missing_ok=True)
        for name in _MANAGED_ENTRIES:
            target = root / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
            os.replace(tmp / name, target)
        os.replace(tmp / META_FILENAME, root / META_FILENAME)
        (root / _INCOMPLETE_MARKER).unlink()
        return _summary(root, meta, generated=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def synthetic_dataset_root() -> Path:
    """``$DETECTRON2_DATASETS/synthetic`` (``./datasets/synthetic`` when the variable is unset)."""
    return Path(os.environ.get("DETECTRON2_DATASETS", "datasets")) / "synthetic"


def ensure_synthetic_dataset(root: Optional[_PathLike] = None, **kwargs: Any) -> Dict[str, Any]:
    """Generate the dataset at ``root`` (default :func:`synthetic_dataset_root`) on first use.

    An existing complete dataset is reused as long as it matches the parameters passed
    explicitly in ``kwargs`` (parameters left out accept any value), so a larger dataset made
    with the CLI is not replaced by the defaults. Otherwise (or with ``overwrite=True``) this is
    :func:`generate_synthetic_dataset`. Returns its summary dict.
    """
    root = Path(root) if root is not None else synthetic_dataset_root()
    if not kwargs.get("overwrite", False):
        meta = load_synthetic_meta(root)
        if meta is not None:
            wanted = {k: v for k, v in kwargs.items() if k != "overwrite"}
            unknown = set(wanted) - {"num_train", "num_val", "seed", "image_size", "max_objects", "style"}
            if unknown:
                raise TypeError(f"unexpected arguments: {sorted(unknown)}")
            if "image_size" in wanted:
                wanted["image_size"] = [int(s) for s in wanted["image_size"]]
            if all(meta.get(k, "shapes" if k == "style" else None) == v for k, v in wanted.items()):
                return _summary(root, meta, generated=False)
    return generate_synthetic_dataset(root, **kwargs)
