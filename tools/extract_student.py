#!/usr/bin/env python
"""The student of a distillation checkpoint, alone, as a plain detector checkpoint.

    python tools/extract_student.py --input output/distill/model_final.pth --output student.pth \
        [--format auto|tprd|detrex|rtdetr] [--ema] [--config-file STUDENT_OR_DISTILL_CONFIG.py]
        [--eval-spatial-size H W]

The input is a checkpoint of this toolbox (``student.*``/``teacher.*`` under ``"model"``) or of the
reference code (flat ``student.*``/``teacher.*`` keys in detrex naming). ``--format tprd`` (default)
writes ``{"model": <student in our naming>}``, which ``train.init_checkpoint`` of the student's
detector config loads; ``--format detrex`` writes the keys in detrex/detectron2 naming, with the
aliases detrex saves, so that detrex's ``DetectionCheckpointer`` and our
``load_detrex_checkpoint(strict=True)`` load it. ``--format rtdetr`` (RT-DETRv2 students; what
``auto``, the default, picks for them, ``tprd`` for the others) writes the official RT-DETRv2 layout,
``{"model": <weights>, "ema": {"module": <EMA weights>, "updates": n}}`` (``"ema"`` only when the
checkpoint has an EMA), with the official key names (ours), which the reference's loaders
(``--tuning``, ``--resume``, its inference scripts) and ``load_rtdetr_checkpoint`` load
(docs/rt_detr.md#after-training). ``--ema`` takes the checkpoint's EMA weights (the averages over the
checkpoint's student; an error when it has none); ``rtdetr`` writes them under ``ema/module``
anyway, and with ``--ema`` under ``model`` too. ``--config-file`` (a student or distillation config) checks that the result loads
strictly into that detector and reports its parameter count; for an RT-DETR student,
``--eval-spatial-size H W`` builds it with that ``eval_spatial_size`` and writes the
``decoder.anchors`` / ``decoder.valid_mask`` of that size (the official files: 640 640). The file is
written atomically.
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
    p.add_argument("--format", choices=("auto", "tprd", "detrex", "rtdetr"), default="auto",
                   help="key naming and layout of the output (auto: rtdetr for RT-DETR students, else tprd)")
    p.add_argument("--ema", action="store_true", help="extract the EMA weights of the checkpoint")
    p.add_argument("--config-file", default="", help="optional: check the result against this config's student")
    p.add_argument("--eval-spatial-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="RT-DETR, with --config-file: write the cached anchors of this input size (official: 640 640)")
    add_override_arguments(p)
    return p.parse_args(argv)


def _set_eval_spatial_size(cfg, size, config_file):
    """Set the student's ``eval_spatial_size`` (encoder and decoder) in ``cfg``."""
    from tprd.engine.predictor import detector_config

    node = detector_config(cfg, "student")
    for part in ("encoder", "decoder"):
        if part not in node:
            raise ValueError(f"--eval-spatial-size: the student of {config_file} has no {part} "
                             "(not an RT-DETR config); drop --eval-spatial-size")
        node[part].eval_spatial_size = list(size)


def main(argv=None) -> int:
    args = parse_args(argv)
    from tprd.checkpoint.student import count_values, extract_student, student_to_detrex
    from tprd.engine.checkpoint import atomic_torch_save

    if args.eval_spatial_size and not args.config_file:
        raise ValueError("--eval-spatial-size needs --config-file (the student's anchors are computed by its model)")
    model = None
    if args.config_file:
        from tprd.engine.main import load_config
        from tprd.engine.predictor import build_detector

        cfg = load_config(args.config_file, args.opts)
        if args.eval_spatial_size:
            _set_eval_spatial_size(cfg, args.eval_spatial_size, args.config_file)
        model = build_detector(cfg, "student", device="cpu")
    student = extract_student(args.input, ema=args.ema, detector=type(model) if model is not None else None)
    is_rtdetr = getattr(student.detector, "family", "") == "rt_detr"
    fmt = ("rtdetr" if is_rtdetr else "tprd") if args.format == "auto" else args.format
    if fmt == "rtdetr" and not is_rtdetr:
        raise ValueError(f"--format rtdetr is the RT-DETRv2 layout, but the student is {student.detector.__name__}; "
                         "use --format tprd or detrex")
    if args.eval_spatial_size and not is_rtdetr:
        raise ValueError(f"--eval-spatial-size is for RT-DETR students, not {student.detector.__name__}")
    # (name, weights): the trained weights, and the EMA weights where the layout holds both
    parts = [("model", student.state_dict)]
    if fmt == "rtdetr" and student.ema_state_dict is not None and not args.ema:
        parts.append(("ema", student.ema_state_dict))
    if model is not None:
        parts = [(name, _checked(model, weights, args)) for name, weights in parts]
    if fmt == "detrex":
        parts = [(name, student_to_detrex(student.detector, weights)) for name, weights in parts]
    if os.path.abspath(args.output) == os.path.abspath(args.input):
        raise SystemExit(f"--output {args.output!r} is the input file; choose another name")
    if fmt == "rtdetr":
        from tprd.checkpoint.rtdetr import rtdetr_checkpoint

        weights = dict(parts)
        if args.ema:  # the averages in both places: every loader gets the EMA weights
            weights["ema"] = weights["model"]
        out = rtdetr_checkpoint(weights["model"], weights.get("ema"), student.ema_updates)
    else:
        out = {"model": parts[0][1]}
    atomic_torch_save(out, args.output)

    weights = parts[0][1]
    print(f"read {args.input}: student in {student.source_naming} naming ({student.detector.__name__}"
          + (f", iteration {student.iteration}" if student.iteration is not None else "")
          + (", EMA weights" if args.ema else "") + ")")
    layout = {"rtdetr": "RT-DETRv2 layout: model" + (", ema/module" if "ema" in out else ""),
              "detrex": "detrex naming", "tprd": "tprd naming"}[fmt]
    print(f"wrote {args.output} ({layout}): {len(weights)} keys, "
          f"{count_values(weights):,} values (tensor elements, shared tensors counted once)")
    if is_rtdetr and "decoder.anchors" not in weights:
        print("note: no decoder.anchors / decoder.valid_mask (the student was built without eval_spatial_size); "
              "the reference's models (eval_spatial_size [640, 640]) need them for a strict load: add "
              "--config-file <config> --eval-spatial-size 640 640")
    if model is not None:
        n = sum(p.numel() for p in model.parameters())
        print(f"loads strictly into {type(model).__name__} of {args.config_file}: {n:,} parameters")
    return 0


def _checked(model, weights, args):
    """``weights`` loaded strictly into ``model``. With ``--eval-spatial-size`` (RT-DETR) the model's
    own anchors / valid mask (of that size) replace the checkpoint's: the result is the model's
    state dict."""
    if not args.eval_spatial_size:
        from tprd.checkpoint import load_state_dict_checked

        load_state_dict_checked(model, weights, strict=True, source=args.input)
        return weights
    from tprd.checkpoint import load_rtdetr_checkpoint

    load_rtdetr_checkpoint(model, weights, strict=True, constant_buffers="model")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (FileNotFoundError, KeyError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
