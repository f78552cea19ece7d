#!/usr/bin/env python
"""Generate the synthetic shape-detection dataset (COCO json + Pascal VOC layout).

Example (from the repository root, no install needed)::

    python tools/make_synthetic_dataset.py --out datasets/synthetic --num-train 64 --num-val 16 --seed 0

Without ``--out`` the dataset goes to ``$DETECTRON2_DATASETS/synthetic`` (``./datasets/synthetic``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

try:
    from tprd.data.synthetic import generate_synthetic_dataset, synthetic_dataset_root
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tprd.data.synthetic import generate_synthetic_dataset, synthetic_dataset_root


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="output directory (default: $DETECTRON2_DATASETS/synthetic)")
    p.add_argument("--num-train", type=int, default=64, help="number of train images (default 64)")
    p.add_argument("--num-val", type=int, default=16, help="number of val images (default 16)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--image-size", type=int, nargs=2, default=(128, 160), metavar=("H", "W"), help="image height and width (default 128 160)")
    p.add_argument("--max-objects", type=int, default=5, help="maximum objects per image (default 5)")
    p.add_argument("--overwrite", action="store_true", help="regenerate even if a matching dataset exists")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = args.out if args.out is not None else synthetic_dataset_root()
    try:
        summary = generate_synthetic_dataset(
            out,
            num_train=args.num_train,
            num_val=args.num_val,
            seed=args.seed,
            image_size=tuple(args.image_size),
            max_objects=args.max_objects,
            overwrite=args.overwrite,
        )
    except (ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({k: v for k, v in summary.items() if k != "meta"}, indent=2))
        return 0
    state = "wrote" if summary["generated"] else "up to date (nothing written; use --overwrite to regenerate)"
    print(f"synthetic dataset {state}: {summary['root']}")
    for split in ("train", "val"):
        c = summary["coco"][split]
        print(
            f"  {split:5s}: {summary['num_images'][split]} images, {summary['num_annotations'][split]} boxes"
            f"  json={c['json_file']}  images={c['image_root']}"
        )
    voc = summary["voc"]
    print(f"  VOC  : {voc['root']}  (ImageSets/Main/{voc['train_split']}.txt = train, {voc['val_split']}.txt = val)")
    print(f"  classes: {', '.join(summary['classes'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
