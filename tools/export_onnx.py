#!/usr/bin/env python
"""Export a detector, or the student of a distillation config, to ONNX.

    python tools/export_onnx.py --config-file CONFIG.py --checkpoint model_final.pth \
        --output model.onnx [--height 800 --width 1333] [--batch-size 1] [--verify] [key=value ...]

The graph (pure-PyTorch deformable attention: ``F.grid_sample``, opset 17) maps
``images [B,3,H,W]`` float RGB 0..255 (not normalised, no padding) to ``scores [B,Q,C]`` (sigmoid
class scores of the final decoder stage) and ``boxes [B,Q,4]`` (``x0,y0,x1,y1`` in pixels of the
input); keep the queries whose best score passes your threshold. The batch size is dynamic; the
image size is fixed at ``--height`` x ``--width`` (the feature-map sizes of the multi-scale
attention are constants of the traced graph): resize or pad your images to it. ``--verify`` runs
the file with onnxruntime on the CPU against PyTorch (batch ``--batch-size`` and one more) and
prints the largest differences. Needs the ``export`` extra: ``pip install -e ".[export]"``.
The checkpoint may be a plain detector checkpoint (ours, detrex's, an official RT-DETRv2 file or
``tools/extract_student.py`` output: ``ema/module`` before ``model``) or a distillation checkpoint.

RT-DETRv2 (docs/rt_detr.md#after-training): the same graph, from stage ``eval_idx``; the image
size defaults to the model's ``eval_spatial_size`` (640x640 in the official configs) and is padded
bottom/right to a multiple of 32 inside the graph. ``--cross-attn-method discrete`` exports the
decoder's discrete sampling (the nearest cell, gathered: no ``GridSample`` node) for runtimes that
lack or mishandle ``GridSample``; it changes the predictions of a model trained with bilinear
sampling (the reference fine-tunes its ``*_dsp`` models for it), so export such a model, or one
whose config already says ``cross_attn_method="discrete"``.
"""
from __future__ import annotations

import argparse
import os
import sys

try:
    import tprd  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

OPSET = 17


def parse_args(argv=None) -> argparse.Namespace:
    from tprd.engine.defaults import add_override_arguments, override_parser

    p = override_parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, help="detector or distillation config")
    p.add_argument("--checkpoint", required=True, help="weights (.pth / .pkl)")
    p.add_argument("--output", required=True, help="the .onnx file to write")
    p.add_argument("--height", type=int, default=None,
                   help="input height the graph is fixed to (default 800; RT-DETR: its eval_spatial_size)")
    p.add_argument("--width", type=int, default=None,
                   help="input width the graph is fixed to (default 1333; RT-DETR: its eval_spatial_size)")
    p.add_argument("--cross-attn-method", choices=("default", "discrete"), default=None,
                   help="RT-DETR: the decoder's deformable sampling (default: the config's; discrete: no GridSample)")
    p.add_argument("--batch-size", type=int, default=1, help="batch of the example input (the axis stays dynamic)")
    p.add_argument("--teacher", action="store_true", help="export the teacher of a distillation config")
    p.add_argument("--verify", action="store_true", help="compare onnxruntime (CPU) with PyTorch")
    add_override_arguments(p)
    return p.parse_args(argv)


def require_export_extra():
    missing = []
    for name in ("onnx",):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ImportError(f"{', '.join(missing)} not installed; install the export extra: pip install -e \".[export]\"")


def default_size(detector):
    """``(height, width)`` of the example input: an RT-DETR's ``eval_spatial_size`` when it has one
    (the size its anchors are cached for), else 800x1333."""
    from tprd.modeling.rt_detr import RTDETR

    if isinstance(detector, RTDETR) and detector.decoder.eval_spatial_size:
        return tuple(int(v) for v in detector.decoder.eval_spatial_size)
    return 800, 1333


def set_cross_attn_method(detector, method: str) -> str:
    """Switch every RT-DETRv2 deformable cross-attention of ``detector`` to ``method``; returns the
    method it had."""
    from tprd.modeling.rt_detr import RTDETR
    from tprd.modeling.rtdetr_decoder import MSDeformableAttentionV2

    if not isinstance(detector, RTDETR):
        raise ValueError(f"--cross-attn-method is RT-DETRv2's decoder option; {type(detector).__name__} has no "
                         "such option: drop --cross-attn-method")
    layers = [m for m in detector.modules() if isinstance(m, MSDeformableAttentionV2)]
    before = layers[0].method
    for m in layers:
        m.method = method
    detector.decoder.cross_attn_method = method
    return before


def export(model, images, path: str) -> None:
    """Trace ``model`` (a :class:`~tprd.engine.predictor.TensorDetector`) on ``images`` into ``path``
    with a dynamic batch axis, using the pure-PyTorch deformable attention."""
    import torch

    from tprd.layers.ms_deform_attn import get_msda_backend, set_msda_backend

    previous = get_msda_backend()
    set_msda_backend("grid_sample")  # traceable, standard ONNX ops
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp"
        with torch.no_grad():
            torch.onnx.export(
                model, (images,), tmp, dynamo=False, opset_version=OPSET,
                input_names=["images"], output_names=["scores", "boxes"],
                dynamic_axes={"images": {0: "batch"}, "scores": {0: "batch"}, "boxes": {0: "batch"}},
            )
        os.replace(tmp, path)
    finally:
        set_msda_backend(previous)


def verify(model, path: str, images_list):
    """Largest absolute differences ``(scores, boxes)`` between onnxruntime and PyTorch per input."""
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    diffs = []
    for images in images_list:
        got = session.run(None, {"images": images.cpu().numpy()})
        with torch.no_grad():
            ref = model(images)
        diffs.append(tuple(float((torch.from_numpy(g) - r.cpu()).abs().max()) for g, r in zip(got, ref)))
    return diffs


def main(argv=None) -> int:
    args = parse_args(argv)
    require_export_extra()
    import warnings

    import torch

    from tprd.engine.main import load_config
    from tprd.engine.predictor import TensorDetector, build_detector, load_detector_weights

    cfg = load_config(args.config_file, args.opts)
    part = "teacher" if args.teacher else "student"
    detector = build_detector(cfg, part, device="cpu")
    load_detector_weights(detector, args.checkpoint, part)
    if args.cross_attn_method:
        before = set_cross_attn_method(detector, args.cross_attn_method)
        if before != args.cross_attn_method:
            print(f"note: the config's cross_attn_method is {before!r}; exporting {args.cross_attn_method!r} "
                  "sampling changes the predictions of weights trained with the other")
    if args.height is None or args.width is None:
        h, w = default_size(detector)
        args.height = h if args.height is None else args.height
        args.width = w if args.width is None else args.width
    model = TensorDetector(detector)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(args.batch_size, 3, args.height, args.width, generator=g) * 255
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python values that become constants
        export(model, images, args.output)
    size = os.path.getsize(args.output) / 2**20
    print(f"wrote {args.output} ({size:.1f} MiB, opset {OPSET}): {type(detector).__name__}, input images "
          f"[batch,3,{args.height},{args.width}] (batch dynamic, image size fixed) -> scores, boxes")
    if args.verify:
        more = torch.rand(args.batch_size + 1, 3, args.height, args.width, generator=g) * 255
        for x, (ds, db) in zip((images, more), verify(model, args.output, [images, more])):
            print(f"onnxruntime vs PyTorch, batch {x.shape[0]}: max |diff| scores {ds:.2e}, boxes {db:.2e} px")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (FileNotFoundError, ImportError, KeyError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
