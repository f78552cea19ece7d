#!/usr/bin/env python
"""The student of a distillation checkpoint, alone, as a plain detector checkpoint.

    python tools/extract_student.py --input output/distill/model_final.pth --output student.pth \
        [--format tprd|detrex] [--ema] [--config-file STUDENT_OR_DISTILL_CONFIG.py]

The input is a checkpoint of this toolbox (``student.*``/``teacher.*`` under ``"model"``) or of the
reference code (flat ``student.*``/``teacher.*`` keys in detrex naming). ``--format tprd`` (default)
writes ``{"model": <student in our naming>}``, which ``train.init_checkpoint`` of the student's
detector config loads; ``--format detrex`` writes the keys in detrex/detectron2 naming, with the
aliases detrex saves, so that detrex's ``DetectionCheckpointer`` and our
``load_detrex_checkpoint(strict=True)`` load it. ``--ema`` takes the checkpoint's EMA weights.
``--config-file`` (a student or distillation config) checks that the result loads strictly into
that detector and reports its parameter count. The file is written atomically.
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
    p.add_argument("--input", required=True, help="distillation checkpoint (.pth / .pkl)")
    p.add_argument("--output", required=True, help="file to write (.pth)")
    p.add_argument("--format", choices=("tprd", "detrex"), default="tprd", help="key naming of the output")
    p.add_argument("--ema", action="store_true", help="extract the EMA weights of the checkpoint")
    p.add_argument("--config-file", default="", help="optional: check the result against this config's student")
    add_override_arguments(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from tprd.checkpoint.student import count_values, extract_student, student_to_detrex
    from tprd.engine.checkpoint import atomic_torch_save

    model = None
    if args.config_file:
        from tprd.engine.main import load_config
        from tprd.engine.predictor import build_detector

        model = build_detector(load_config(args.config_file, args.opts), "student", device="cpu")
    student = extract_student(args.input, ema=args.ema, detector=type(model) if model is not None else None)
    weights = student.state_dict
    if model is not None:
        from tprd.checkpoint import load_state_dict_checked

        load_state_dict_checked(model, weights, strict=True, source=args.input)
    if args.format == "detrex":
        weights = student_to_detrex(student.detector, weights)
    if os.path.abspath(args.output) == os.path.abspath(args.input):
        raise SystemExit(f"--output {args.output!r} is the input file; choose another name")
    atomic_torch_save({"model": weights}, args.output)

    print(f"read {args.input}: student in {student.source_naming} naming ({student.detector.__name__}"
          + (f", iteration {student.iteration}" if student.iteration is not None else "")
          + (", EMA weights" if args.ema else "") + ")")
    print(f"wrote {args.output} ({args.format} naming): {len(weights)} keys, "
          f"{count_values(weights):,} values (tensor elements, shared tensors counted once)")
    if model is not None:
        n = sum(p.numel() for p in model.parameters())
        print(f"loads strictly into {type(model).__name__} of {args.config_file}: {n:,} parameters")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (FileNotFoundError, KeyError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
