#!/usr/bin/env python
"""Merge student backbone weights and a teacher checkpoint into one distillation init file.

    python merge_weight.py --input1 resnet18-f37072fd.pth \\
        --input2 dino_r50_4scale_12ep_49_2AP.pth --output init/dino_r50_r18.pth

Then train with ``train.init_checkpoint=init/dino_r50_r18.pth``. ``--input1`` may be the
torchvision ImageNet file or a detectron2-named backbone; ``--input2`` a Deformable DETR, DINO or
DAB-DETR checkpoint (detrex or this toolbox; ``.pth`` or ``.pkl``; weights nested under ``model``,
``state_dict``, ``ema`` or ``module`` are unwrapped). Inputs that are not what they should be (a
detector as input1, the same file twice, weights under an unknown entry) are refused before anything
is written: ``error: ...`` and exit code 2.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tprd.checkpoint.merge import check_merge_inputs, merge_weights, read_nested_state_dict, save_atomic  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input1", required=True, help="student backbone weights (torchvision or detectron2 naming)")
    parser.add_argument("--input2", required=True,
                        help="teacher detector checkpoint (detrex, or a run of this toolbox: <run>/model_final.pth)")
    parser.add_argument("--output", required=True, help="where to write the merged init checkpoint")
    args = parser.parse_args(argv)
    from tprd.engine.defaults import user_errors_exit

    # every check before anything is written: a refused input leaves no file
    with user_errors_exit():
        student, trail1 = read_nested_state_dict(args.input1)
        teacher, trail2 = read_nested_state_dict(args.input2)
        check_merge_inputs(student, teacher, args.input1, args.input2, args.output)
    for path, trail in ((args.input1, trail1), (args.input2, trail2)):
        if trail:
            print(f"{path}: weights unwrapped from {' / '.join(trail)}")
    merged, report = merge_weights(student, teacher)
    print(report.summary())
    if report.backbone_missing or report.backbone_unexpected:
        print(f"warning: the student backbone in {args.input1} did not match a ResNet completely", file=sys.stderr)
    save_atomic(merged, args.output)
    print(f"wrote {len(merged)} keys to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
