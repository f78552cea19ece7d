#!/usr/bin/env python
"""Run a detector, or the student of a distillation config, on images and draw its detections.

    python demo/demo.py --config-file CONFIG.py --input img1.jpg img2.jpg | DIR \
        --output OUT_DIR [--confidence-threshold 0.5] [--opts train.init_checkpoint=model.pth ...]

detrex's interface. Every input image (``--input`` files, or the images of a folder) is written to
``--output`` under its own name with the boxes, class names and scores above the threshold drawn;
the time per image (resize + forward, after one warm-up image) is printed. A distillation config
runs its student (``--teacher``: its teacher). Weights: ``train.init_checkpoint`` (a plain detector
checkpoint, ours or detrex's, or a distillation checkpoint); the device is ``train.device``
(``--opts train.device=cpu`` on a machine without GPU). Class names come from the config's test
dataset.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

try:
    import tprd  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def parse_args(argv=None) -> argparse.Namespace:
    from tprd.engine.defaults import add_override_arguments, override_parser

    p = override_parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, metavar="FILE", help="detector or distillation config")
    p.add_argument("--input", nargs="+", required=True, help="image files, or one folder of images")
    p.add_argument("--output", required=True, help="folder for the drawn images")
    p.add_argument("--confidence-threshold", type=float, default=0.5, help="lowest score drawn (default 0.5)")
    p.add_argument("--teacher", action="store_true", help="run the teacher of a distillation config")
    add_override_arguments(p)
    return p.parse_args(argv)


def input_images(inputs):
    """The image paths of ``--input``: the files given, or the images of one folder (sorted)."""
    if len(inputs) == 1 and os.path.isdir(inputs[0]):
        files = sorted(os.path.join(inputs[0], f) for f in os.listdir(inputs[0])
                       if f.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            raise FileNotFoundError(f"--input folder {inputs[0]!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        return files
    missing = [f for f in inputs if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(f"--input: {missing[0]!r} does not exist; pass image files or one folder")
    return list(inputs)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from tprd.data.datasets import read_image
    from tprd.engine.main import load_config
    from tprd.engine.predictor import Predictor, build_detector, class_names, load_detector_weights
    from tprd.visualization import draw_boxes, save_image

    files = input_images(args.input)
    cfg = load_config(args.config_file, args.opts)
    part = "teacher" if args.teacher else "student"
    model = build_detector(cfg, part)
    checkpoint = str(cfg.train.get("init_checkpoint", "") or "") if "train" in cfg else ""
    if checkpoint:
        load_detector_weights(model, checkpoint, part)
    else:
        print("warning: no train.init_checkpoint given: the detector has random weights", file=sys.stderr)
    names = class_names(cfg, getattr(model, "num_classes", 0))
    predictor = Predictor(cfg, model)
    device = next(model.parameters()).device
    print(f"{type(model).__name__} on {device}, {len(files)} image(s), threshold {args.confidence_threshold}")

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    predictor(read_image(files[0]))  # warm-up (lazy initialisation, kernel selection)
    os.makedirs(args.output, exist_ok=True)
    for path in files:
        image = read_image(path)
        sync()
        start = time.perf_counter()
        det = predictor(image)
        sync()
        seconds = time.perf_counter() - start
        keep = det["scores"] >= args.confidence_threshold
        drawn = draw_boxes(image, det["boxes"][keep], det["labels"][keep], det["scores"][keep], names)
        out = os.path.join(args.output, os.path.basename(path))
        save_image(drawn, out)
        print(f"{path}: {int(keep.sum())} detections in {seconds * 1000:.1f} ms -> {out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (FileNotFoundError, KeyError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
