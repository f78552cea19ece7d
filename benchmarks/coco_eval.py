#!/usr/bin/env python
"""COCO box evaluation: pycocotools against faster-coco-eval on a COCO-size synthetic run.

    python benchmarks/coco_eval.py --images 5000 --rounds 3

A ground truth like COCO val2017 (``--images`` images of 640x480, 80 categories with non-contiguous
ids, 1-15 boxes per image, about 1 % crowd) and detections like a detector's (each GT box jittered,
some with a wrong class, plus random false positives: 100 per image; random scores, those of
the objects' detections mostly higher). Both engines
score the same detections through :class:`tprd.evaluation.COCOEvaluator` (``engine=...``); the
rounds alternate the engines. Prints the time of ``evaluate()`` (results json -> metrics; the
ground truth is loaded before, as it is once per run) and the largest metric difference.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def make_run(folder: str, images: int, seed: int = 0):
    """Write the ground-truth json into ``folder``; return it and per-image predictions."""
    import torch

    rng = np.random.default_rng(seed)
    cat_ids = [i + 1 + i // 10 for i in range(80)]  # non-contiguous, as COCO's
    gt_images, anns, preds = [], [], {}
    for img in range(1, images + 1):
        gt_images.append({"id": img, "file_name": f"{img:012d}.jpg", "height": 480, "width": 640})
        n = int(rng.integers(1, 16))
        boxes, labels = [], []
        for _ in range(n):
            w, h = rng.uniform(4, 300, 2)
            x, y = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
            cat = int(rng.integers(0, 80))
            anns.append({"id": len(anns) + 1, "image_id": img, "category_id": cat_ids[cat], "bbox": [x, y, w, h],
                         "area": float(w * h), "iscrowd": int(rng.random() < 0.01)})
            jit = rng.normal(0, 0.08, 4) * [w, h, w, h]
            boxes.append([x + jit[0], y + jit[1], x + w + jit[2], y + h + jit[3]])
            labels.append(cat if rng.random() < 0.8 else int(rng.integers(0, 80)))
        for _ in range(100 - n):
            w, h = rng.uniform(4, 300, 2)
            x, y = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
            boxes.append([x, y, x + w, y + h])
            labels.append(int(rng.integers(0, 80)))
        # detections of objects mostly score higher than the false positives
        scores = np.concatenate([rng.uniform(0.2, 1.0, n), rng.uniform(0.01, 0.7, 100 - n)])
        preds[img] = {"boxes": torch.tensor(boxes, dtype=torch.float32),
                      "scores": torch.tensor(scores, dtype=torch.float32),
                      "labels": torch.tensor(labels)}
    gt = {"images": gt_images, "annotations": anns,
          "categories": [{"id": c, "name": f"class{c}"} for c in cat_ids]}
    path = os.path.join(folder, "gt.json")
    with open(path, "w") as f:
        json.dump(gt, f)
    return path, preds


def evaluate(dataset: str, preds, engine: str):
    """``(metrics, seconds of evaluate())`` of ``engine`` on the registered ``dataset``."""
    from tprd.evaluation import COCOEvaluator

    ev = COCOEvaluator(dataset, distributed=False, engine=engine)
    ev.coco_gt  # load the ground truth first (once per run in training)
    ev.reset()
    ids = sorted(preds)
    for start in range(0, len(ids), 64):
        chunk = ids[start:start + 64]
        ev.process([{"image_id": i} for i in chunk], [preds[i] for i in chunk])
    t = time.perf_counter()
    metrics = ev.evaluate()["bbox"]
    return metrics, time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from tprd.data.catalog import register_coco_instances

    engines = ("pycocotools", "faster_coco_eval")
    with tempfile.TemporaryDirectory() as folder:
        path, preds = make_run(folder, args.images)
        register_coco_instances("coco_eval_benchmark", path, folder)
        times = {e: [] for e in engines}
        metrics = {}
        for rnd in range(args.rounds):
            for engine in engines:
                m, secs = evaluate("coco_eval_benchmark", preds, engine)
                times[engine].append(secs)
                metrics[engine] = m
                print(f"round {rnd} {engine}: {secs:.2f} s, AP {m['AP']:.4f}", file=sys.stderr, flush=True)
    diff = max(abs(metrics[engines[0]][k] - metrics[engines[1]][k]) for k in metrics[engines[0]]
               if np.isfinite(metrics[engines[0]][k]))
    base = statistics.median(times[engines[0]])
    print(f"{args.images} images, 100 detections each, {args.rounds} rounds, load average (1 min) {os.getloadavg()[0]:.1f}")
    print()
    print("| engine | evaluate() s | speed-up | AP | AP50 | AP75 | APs | APm | APl |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for e in engines:
        t = times[e]
        m = metrics[e]
        print(f"| {e} | {statistics.median(t):.2f} ({min(t):.2f}-{max(t):.2f}) | {base / statistics.median(t):.1f}x | "
              + " | ".join(f"{m[k]:.4f}" for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")) + " |")
    print()
    print(f"Largest difference over all metrics (including the 80 per-class APs), in AP points: {diff:.2e}")


if __name__ == "__main__":
    main()
