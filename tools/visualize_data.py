#!/usr/bin/env python
"""The training data as the model sees it: images after augmentation with their boxes drawn.

    python tools/visualize_data.py --config-file CONFIG.py --output-dir vis_dir \
        [--source dataloader|annotation] [--num-images 20] [key=value ...]

detrex's interface. ``--source dataloader`` (default) draws batches of ``dataloader.train``
(the config's augmentation: flips, resizes, crops; boxes clipped and filtered as in training);
``--source annotation`` draws the raw annotations of ``dataloader.train.dataset.names``. Images are
written as ``<output-dir>/<n>_<image file name>``, class names from the dataset's metadata; the
first ``--num-images`` are written (the training loader is infinite).
"""
from __future__ import annotations

import argparse
import os
import sys

try:
    import tprd  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None) -> argparse.Namespace:
    from tprd.engine.defaults import add_override_arguments, override_parser

    p = override_parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, help="detector or distillation config")
    p.add_argument("--source", choices=("annotation", "dataloader"), default="dataloader",
                   help="raw annotations, or the training loader's augmented samples")
    p.add_argument("--output-dir", required=True, help="folder for the images")
    p.add_argument("--num-images", type=int, default=20, help="how many images to write (default 20)")
    add_override_arguments(p)
    return p.parse_args(argv)


def samples(cfg, source: str):
    """``(image uint8 [3,H,W], boxes [G,4] xyxy, classes [G], file_name)`` one at a time."""
    import torch

    from tprd.config import instantiate
    from tprd.data.datasets import read_image
    from tprd.data.loader import get_detection_dataset_dicts

    if source == "annotation":
        for r in get_detection_dataset_dicts(cfg.dataloader.train.dataset.names, filter_empty=False):
            boxes = torch.as_tensor(r.get("boxes", torch.zeros(0, 4)), dtype=torch.float32).reshape(-1, 4)
            classes = torch.as_tensor(r.get("classes", torch.zeros(0)), dtype=torch.int64).reshape(-1)
            yield read_image(r["file_name"]), boxes, classes, r["file_name"]
        return
    for batch in instantiate(cfg.dataloader.train):
        for s in batch:
            yield s["image"], s["gt_boxes"], s["gt_classes"], s.get("file_name", "image.jpg")


def main(argv=None) -> int:
    args = parse_args(argv)
    from tprd.data import MetadataCatalog
    from tprd.engine.main import load_config
    from tprd.visualization import draw_boxes, save_image

    cfg = load_config(args.config_file, args.opts)
    if "dataloader" not in cfg or "train" not in cfg.dataloader:
        raise KeyError(f"{args.config_file} has no dataloader.train; pass a training config")
    names = cfg.dataloader.train.dataset.names
    first = names if isinstance(names, str) else list(names)[0]
    classes = list(MetadataCatalog.get(first).get("thing_classes") or [])
    os.makedirs(args.output_dir, exist_ok=True)
    n = 0
    for image, boxes, labels, file_name in samples(cfg, args.source):
        if n >= args.num_images:
            break
        out = os.path.join(args.output_dir, f"{n:04d}_{os.path.basename(str(file_name))}")
        save_image(draw_boxes(image, boxes, labels, None, classes), out)
        n += 1
    print(f"wrote {n} images ({args.source}) to {args.output_dir}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
