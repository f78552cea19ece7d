#!/usr/bin/env python
"""Merge student backbone weights and a teacher checkpoint into one distillation init file.

    python merge_weight.py --input1 resnet18-f37072fd.pth \\
        --input2 dino_r50_4scale_12ep_49_2AP.pth --output init/dino_r50_r18.pth

Then train with ``train.init_checkpoint=init/dino_r50_r18.pth``. ``--input1`` may be the
torchvision ImageNet file or a detectron2-named backbone; ``--input2`` a detrex checkpoint
(``.pth`` with ``{"model": ...}`` or a bare state dict, or a ``.pkl``).
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tprd.checkpoint.merge import load_state_dict_file, merge_weights, save_atomic  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input1", required=True, help="student backbone weights (torchvision or detectron2 naming)")
    parser.add_argument("--input2", required=True, help="teacher detector checkpoint (detrex)")
    parser.add_argument("--output", required=True, help="where to write the merged init checkpoint")
    args = parser.parse_args(argv)
    try:
        student = load_state_dict_file(args.input1)
        teacher = load_state_dict_file(args.input2)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    merged, report = merge_weights(student, teacher)
    print(report.summary())
    if report.backbone_missing or report.backbone_unexpected:
        print(f"warning: the student backbone in {args.input1} did not match a ResNet completely", file=sys.stderr)
    save_atomic(merged, args.output)
    print(f"wrote {len(merged)} keys to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
