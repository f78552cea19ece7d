#!/usr/bin/env python
"""Pretrain a ResNet backbone by multi-label classification on a synthetic dataset (cached).

    python tools/pretrain_backbone.py [--dataset synthetic_paper_train] [--val synthetic_paper_val] \\
        [--depth 18] [--iters 1000] [--batch 32] [--out FILE]

Prints the path of the backbone file (torchvision names, no ``fc``), which ``train.init_checkpoint``
and ``merge_weight.py`` take like an ImageNet ResNet. See :mod:`tprd.engine.pretrain`.
"""
import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tprd.engine.pretrain import PretrainSettings, pretrain_backbone_file, pretrained_backbone  # noqa: E402


def main(argv=None) -> Path:
    d = PretrainSettings()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default=d.dataset)
    p.add_argument("--val", default="synthetic_paper_val", help="dataset for the validation mAP ('' for none)")
    p.add_argument("--depth", type=int, default=d.depth)
    p.add_argument("--iters", type=int, default=d.iters)
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--crop", type=int, nargs=2, default=list(d.crop), metavar=("H", "W"))
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", type=Path, default=None, help="write here instead of the dataset's backbones/ cache")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    settings = PretrainSettings(dataset=args.dataset, depth=args.depth, iters=args.iters, batch=args.batch,
                                crop=tuple(args.crop), lr=args.lr, seed=args.seed)
    if args.out is not None:
        pretrain_backbone_file(settings, args.out, args.val or None)
        path = args.out
    else:
        path = pretrained_backbone(settings, args.val or None)
    print(path)
    return path


if __name__ == "__main__":
    main()
