#!/usr/bin/env python
"""Predictions of ``coco_instances_results.json`` next to the ground truth, one image per file.

    python tools/visualize_json_results.py --input output/run/coco_instances_results.json \
        --output vis_dir --dataset synthetic_val [--conf-threshold 0.5]

detrex's interface. For every image of the dataset that has predictions, writes
``<output>/<image file name>``: predictions with score >= ``--conf-threshold`` on the left, the
ground-truth boxes on the right, class names from the dataset's metadata. VOC-style datasets are
read the same way (their results file maps image ids to the dataset's records).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict

try:
    import tprd  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="coco_instances_results.json written by the COCO evaluator")
    p.add_argument("--output", required=True, help="folder for the images")
    p.add_argument("--dataset", default="coco_2017_val", help="the dataset the predictions are for")
    p.add_argument("--conf-threshold", type=float, default=0.5, help="lowest prediction score drawn")
    return p.parse_args(argv)


def read_predictions(path: str):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--input {path!r} does not exist; it is written to train.output_dir by an "
                                "evaluation (coco_instances_results.json)")
    try:
        with open(path, encoding="utf-8") as f:
            preds = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"--input {path!r} is not JSON ({e})") from e
    if not isinstance(preds, list) or (preds and not {"image_id", "category_id", "bbox", "score"} <= set(preds[0])):
        raise ValueError(f"--input {path!r} is not a COCO results list (image_id, category_id, bbox, score)")
    by_image = defaultdict(list)
    for p in preds:
        by_image[p["image_id"]].append(p)
    return by_image


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from tprd.data import MetadataCatalog
    from tprd.data.datasets import read_image
    from tprd.data.loader import get_detection_dataset_dicts
    from tprd.visualization import draw_boxes, save_image, side_by_side

    by_image = read_predictions(args.input)
    records = get_detection_dataset_dicts(args.dataset, filter_empty=False)
    meta = MetadataCatalog.get(args.dataset)
    names = list(meta.get("thing_classes") or [])
    to_contiguous = meta.get("thing_dataset_id_to_contiguous_id") or {}
    known = {r["image_id"] for r in records}
    if by_image and not (set(by_image) & known):
        raise ValueError(f"no image id of {args.input!r} is in dataset {args.dataset!r}; pass the dataset that "
                         "was evaluated with --dataset")
    written = 0
    os.makedirs(args.output, exist_ok=True)
    for record in records:
        preds = [p for p in by_image.get(record["image_id"], []) if p["score"] >= args.conf_threshold]
        if record["image_id"] not in by_image:
            continue
        image = read_image(record["file_name"])
        xywh = torch.tensor([p["bbox"] for p in preds], dtype=torch.float32).reshape(-1, 4)
        boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
        labels = torch.tensor([to_contiguous.get(p["category_id"], p["category_id"]) for p in preds],
                              dtype=torch.int64)
        scores = torch.tensor([p["score"] for p in preds], dtype=torch.float32)
        left = draw_boxes(image, boxes, labels, scores, names)
        gt_boxes = torch.as_tensor(record.get("boxes", torch.zeros(0, 4)), dtype=torch.float32).reshape(-1, 4)
        gt_labels = torch.as_tensor(record.get("classes", torch.zeros(0)), dtype=torch.int64).reshape(-1)
        right = draw_boxes(image, gt_boxes, gt_labels, None, names)
        save_image(side_by_side(left, right), os.path.join(args.output, os.path.basename(record["file_name"])))
        written += 1
    print(f"wrote {written} images (predictions | ground truth) to {args.output}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
