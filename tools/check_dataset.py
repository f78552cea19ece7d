#!/usr/bin/env python
"""Check the datasets of a config before training on them: every check done at load time, and
every image decoded.

    python tools/check_dataset.py --config-file CONFIG.py [--split train|test|all] [--workers N] \\
        [--opts key=value ...]

For each dataset of ``dataloader.train`` / ``dataloader.test`` (``--split``, default ``all``):

* the checks of loading (:mod:`tprd.data.checks`): an annotation file that does not parse (file,
  line, column), missing files or folders, category ids used but not listed, a class count that
  differs from ``model.num_classes``, a training set without annotations, image files missing on
  disk; annotations that loading skips (unknown ``image_id``, a box that is not four finite numbers,
  of zero or negative size or outside its image), counted;
* every image decoded (``--workers`` processes, default: all cores; a progress bar on a terminal):
  files that do not decode or are truncated, and sizes that differ from the annotation file's
  ``width`` / ``height``.

Prints one table of findings (dataset, severity, what, how many, examples) and exits with 1 when
any finding is an error, 0 otherwise (warnings: the skipped annotations, which training leaves out).
"""
from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

try:
    import tprd  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass
class Finding:
    dataset: str
    severity: str  # "error" or "warning"
    what: str
    count: int = 1
    examples: List[str] = field(default_factory=list)


def _examples(items: Sequence[Any], limit: int = 3) -> List[str]:
    return [str(i) for i in items[:limit]] + (["..."] if len(items) > limit else [])


def decode_one(item: Tuple[str, int, int]) -> Optional[Tuple[str, str]]:
    """``(path, problem)`` for an image that does not decode or whose size is not the expected one."""
    path, width, height = item
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            im.load()  # the whole file: a truncated one fails here
            im = ImageOps.exif_transpose(im)
            size = im.size
    except FileNotFoundError:
        return path, "missing"
    except Exception as e:  # Pillow raises many types for broken files
        return path, f"does not decode ({type(e).__name__}: {e})"
    if width and height and tuple(size) != (int(width), int(height)):
        return path, f"is {size[0]}x{size[1]}, the annotations say {width}x{height}"
    return None


def _images_of(records: List[Dict[str, Any]]) -> List[Tuple[str, int, int]]:
    return [(r["file_name"], int(r.get("width", 0)), int(r.get("height", 0))) for r in records]


def check_split(cfg: Any, split: str, findings: List[Finding]) -> List[Tuple[str, str, int, int]]:
    """The load-time checks of one split's datasets; returns ``(dataset, path, width, height)`` to decode."""
    from tprd.data import DatasetCatalog
    from tprd.data.catalog import prepare_dataset, resolve_dataset_names
    from tprd.data.checks import check_coco_json, missing_image_files
    from tprd.engine.defaults import USER_ERRORS, find_user_error, user_error_message
    from tprd.engine.setup_checks import check_num_classes
    from tprd.engine.setup_checks import _get

    node = _get(cfg, f"dataloader.{split}.dataset")
    if node is None or not hasattr(node, "get") or node.get("names") is None:
        return []
    names = resolve_dataset_names(node.get("names"))
    to_decode: List[Tuple[str, str, int, int]] = []
    for name in names:
        label = f"{name} ({split})"
        try:
            meta = prepare_dataset(name)
        except Exception as e:
            if find_user_error(e) is None:
                raise
            findings.append(Finding(label, "error", " ".join(user_error_message(e).split())))
            continue
        records = None
        if meta.get("evaluator_type") == "coco" and meta.get("json_file"):
            try:
                data = check_coco_json(meta.json_file, meta.image_root, name=name, check_files=False)
            except USER_ERRORS as e:
                findings.append(Finding(label, "error", str(e)))
                continue
            _skip_findings(label, data.skips, "annotations", findings)
            images = data.dataset["images"]
            missing = missing_image_files([im["file_name"] for im in images], meta.image_root)
            if missing:
                findings.append(Finding(label, "error", f"image files missing under {meta.image_root}", len(missing),
                                        _examples(missing)))
            missing_set = set(missing)
            to_decode += [(label, os.path.join(meta.image_root, im["file_name"]), int(im["width"]), int(im["height"]))
                          for im in images if im["file_name"] not in missing_set]
            if not data.dataset["annotations"]:
                severity = "error" if split == "train" else "warning"
                findings.append(Finding(label, severity, "no usable annotation" + (
                    ": it cannot train a detector" if split == "train" else ": evaluation gives no AP (nan)")))
            continue
        # VOC and other registered datasets: the loader's own checks, images listed by its records
        try:
            if meta.get("evaluator_type") == "voc":
                import logging

                from tprd.data.checks import strict_loading
                from tprd.data.datasets import load_voc_instances

                captured: List[str] = []

                class _Catch(logging.Handler):
                    def emit(self, record):
                        captured.append(record.getMessage())

                handler = _Catch(logging.WARNING)
                logging.getLogger("tprd.data").addHandler(handler)
                try:
                    with strict_loading(False):
                        records = load_voc_instances(meta.dirname, meta.split, meta.thing_classes,
                                                     dataset_name=name, check_files=False)
                finally:
                    logging.getLogger("tprd.data").removeHandler(handler)
                for text in captured:
                    if ": skipped " in text:
                        findings.append(Finding(label, "warning", text.split(": ", 1)[1]))
            else:
                records = DatasetCatalog.get(name)
        except Exception as e:
            if find_user_error(e) is None:
                raise
            findings.append(Finding(label, "error", user_error_message(e)))
            continue
        files = [r["file_name"] for r in records]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            findings.append(Finding(label, "error", "image files missing", len(missing), _examples(missing)))
        missing_set = set(missing)
        to_decode += [(label, f, w, h) for f, w, h in _images_of(records) if f not in missing_set]
        if not any(len(r.get("classes", ())) for r in records):
            severity = "error" if split == "train" else "warning"
            findings.append(Finding(label, severity, "no usable annotation"))
    try:
        check_num_classes(cfg, split)
    except USER_ERRORS as e:
        findings.append(Finding(", ".join(names), "error", str(e)))
    return to_decode


def _skip_findings(label: str, skips, what: str, findings: List[Finding]) -> None:
    from tprd.data.checks import SKIP_REASONS

    for reason, words in SKIP_REASONS.items():
        ids = skips.ids[reason]
        if ids:
            findings.append(Finding(label, "warning", f"{what} {words} (skipped)", len(ids), _examples(ids)))


def decode_images(items: List[Tuple[str, str, int, int]], workers: int, findings: List[Finding]) -> None:
    from tprd.progress import progress_bar

    problems: Dict[Tuple[str, str], List[str]] = {}
    jobs = [(path, w, h) for _, path, w, h in items]
    labels = [label for label, _, _, _ in items]
    with progress_bar(len(jobs), "decode", unit="img") as bar:
        if workers <= 1:
            results = map(decode_one, jobs)
            for label, res in zip(labels, results):
                _note(label, res, problems)
                bar.update(1)
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                for label, res in zip(labels, pool.map(decode_one, jobs, chunksize=16)):
                    _note(label, res, problems)
                    bar.update(1)
    for (label, kind), paths in problems.items():
        findings.append(Finding(label, "error", kind, len(paths), _examples(paths)))


def _note(label: str, res: Optional[Tuple[str, str]], problems: Dict[Tuple[str, str], List[str]]) -> None:
    if res is None:
        return
    path, problem = res
    kind = ("images that do not decode or are truncated" if problem.startswith("does not decode")
            else "images whose size differs from the annotation file" if problem.startswith("is ")
            else "image files missing")
    problems.setdefault((label, kind), []).append(f"{path} {problem}" if kind != "image files missing" else path)


def format_table(findings: List[Finding]) -> str:
    if not findings:
        return "no problem found"
    rows = [("dataset", "severity", "finding", "count", "examples")]
    for f in findings:
        rows.append((f.dataset, f.severity, f.what, str(f.count), "; ".join(f.examples)))
    widths = [min(max(len(r[i]) for r in rows), 60 if i == 2 else 40) for i in range(4)]
    lines = []
    for i, r in enumerate(rows):
        cells = [r[k].ljust(widths[k]) if len(r[k]) <= widths[k] else r[k] for k in range(4)]
        lines.append("  ".join(cells) + "  " + r[4])
        if i == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 8)
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from tprd.engine.defaults import add_override_arguments, override_parser, user_errors_exit

    p = override_parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, metavar="FILE", help="detector or distillation config")
    p.add_argument("--split", choices=("train", "test", "all"), default="all", help="which datasets (default all)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="processes decoding images (default: every core)")
    p.add_argument("--no-decode", action="store_true", help="only the load-time checks (no image is decoded)")
    add_override_arguments(p)
    args = p.parse_args(argv)
    from tprd.engine.main import load_config

    with user_errors_exit():
        cfg = load_config(args.config_file, args.opts)
    findings: List[Finding] = []
    splits = ("train", "test") if args.split == "all" else (args.split,)
    to_decode: List[Tuple[str, str, int, int]] = []
    for split in splits:
        to_decode += check_split(cfg, split, findings)
    if not args.no_decode and to_decode:
        decode_images(to_decode, max(1, int(args.workers)), findings)
    print(format_table(findings))
    errors = sum(1 for f in findings if f.severity == "error")
    warnings = len(findings) - errors
    print(f"\n{len(to_decode)} images checked; {errors} error finding(s), {warnings} warning(s)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
