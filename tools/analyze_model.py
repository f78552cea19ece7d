#!/usr/bin/env python
"""Parameters, FLOPs and inference speed of a detector, or of a distillation config's student and
teacher -- the size/speed table of a distillation paper.

    python tools/analyze_model.py --config-file CONFIG.py --tasks parameter flop speed \
        [--height 800 --width 1333] [--batch-size 1] [--num-iters 20] [--warmup 3] [key=value ...]

* ``parameter``: parameters per module (fvcore's ``parameter_count_table``, depth ``--max-depth``)
  and the totals (all, trainable).
* ``flop``: FLOPs with fvcore on one random ``[B,3,H,W]`` input, per module and per operator.
  fvcore's unit: one multiply-add = one FLOP; elementwise operations (additions, activations,
  softmax) are not counted; ``scaled_dot_product_attention`` counts its two matrix products.
  Deformable attention: each bilinear sample costs 4 multiply-adds per
  channel -- for every query, head, level and point, ``4 * head_dim`` -- whether it runs as
  ``aten::grid_sampler`` (the pure-PyTorch path) or as a custom autograd Function (a handle is
  registered for such ops, from their inputs ``value [B,S,M,Dh]`` and ``sampling_locations
  [B,Q,M,L,P,2]``); the attention-weighted sum over samples is elementwise, not counted.
* ``speed``: images per second of the detector's inference forward (normalisation, network, top-k)
  on ``train.device``, batch ``--batch-size`` of ``H x W`` random images, after ``--warmup``
  iterations that are not timed; median and spread over ``--num-iters`` timed iterations.

A distillation config reports its student and its teacher (``--part student`` or ``teacher`` for
one); weights do not matter here, so none are loaded.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any, Dict, List

try:
    import tprd  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TASKS = ("parameter", "flop", "speed")


def parse_args(argv=None) -> argparse.Namespace:
    from tprd.engine.defaults import add_override_arguments, override_parser

    p = override_parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, help="detector or distillation config")
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS), help="what to report")
    p.add_argument("--part", choices=("student", "teacher", "both"), default="both",
                   help="for a distillation config: which detector(s) (default both)")
    p.add_argument("--height", type=int, default=800, help="input height for flop/speed (default 800)")
    p.add_argument("--width", type=int, default=1333, help="input width for flop/speed (default 1333)")
    p.add_argument("--batch-size", type=int, default=1, help="batch for flop/speed (default 1)")
    p.add_argument("--num-iters", type=int, default=20, help="timed iterations (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up iterations (default 3)")
    p.add_argument("--max-depth", type=int, default=2, help="module depth of the tables (default 2)")
    add_override_arguments(p)
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------------
def bilinear_sample_flops(inputs: List[Any], outputs: List[Any]) -> int:
    """fvcore handle of a deformable-attention Function: 4 multiply-adds per channel for every
    bilinear sample, i.e. ``4 * prod(sampling_locations.shape[:-1]) * head_dim``."""
    from fvcore.nn.jit_handles import get_shape

    shapes = [get_shape(x) for x in inputs]
    value = next(s for s in shapes if s is not None and len(s) == 4)
    locations = next(s for s in shapes if s is not None and len(s) == 6)
    samples = 1
    for d in locations[:-1]:
        samples *= int(d)
    return 4 * samples * int(value[-1])


def grid_sampler_flops(inputs: List[Any], outputs: List[Any]) -> int:
    """``aten::grid_sampler`` (bilinear): 4 multiply-adds per output element ``[N,C,Hout,Wout]``."""
    from fvcore.nn.jit_handles import get_shape

    n = 1
    for d in get_shape(outputs[0]):
        n *= int(d)
    return 4 * n


def sdpa_flops(inputs: List[Any], outputs: List[Any]) -> int:
    """``aten::scaled_dot_product_attention`` (q ``[..,Tq,D]``, k ``[..,Tk,D]``, v ``[..,Tk,Dv]``):
    the two matrix products, ``prod(batch dims) * Tq * Tk * (D + Dv)`` multiply-adds."""
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(x) for x in inputs[:3])
    batch = 1
    for d in q[:-2]:
        batch *= int(d)
    return batch * int(q[-2]) * int(k[-2]) * (int(q[-1]) + int(v[-1]))


def is_msda_op(name: str) -> bool:
    """A custom autograd Function of deformable attention: ``[prim::]PythonOp.<name with MSDA or
    Deform>`` (fvcore drops the ``prim::`` prefix in its per-operator counts)."""
    lowered = name.lower()
    return name.split("::")[-1].startswith("PythonOp") and ("deform" in lowered or "msda" in lowered)


def count_flops(detector, images):
    """fvcore ``FlopCountAnalysis`` of the detector on ``images``, with the deformable-attention
    handles registered; custom Function ops are found by name after a first trace."""
    import warnings

    from fvcore.nn import FlopCountAnalysis

    from tprd.engine.predictor import TensorDetector

    model = TensorDetector(detector)

    def analysis(extra=()):
        a = FlopCountAnalysis(model, (images,)).set_op_handle("aten::grid_sampler", grid_sampler_flops)
        a = a.set_op_handle("aten::scaled_dot_product_attention", sdpa_flops)
        for name in extra:
            a = a.set_op_handle(name, bilinear_sample_flops)
        return a.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flops = analysis()
        flops.total()
        custom = [n for n in flops.unsupported_ops() if is_msda_op(n)]
        if custom:
            flops = analysis(custom)
            flops.total()
    return flops


# --------------------------------------------------------------------------------------------
# Speed
# --------------------------------------------------------------------------------------------
def measure_speed(detector, batch: int, height: int, width: int, iters: int, warmup: int) -> Dict[str, float]:
    """Images/s of ``detector(batched_inputs)`` in eval mode under ``no_grad``: median and range
    over ``iters`` timed iterations after ``warmup`` untimed ones."""
    import torch

    device = next(detector.parameters()).device
    g = torch.Generator().manual_seed(0)
    inputs = [{"image": (torch.rand(3, height, width, generator=g) * 255).to(device)} for _ in range(batch)]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times = []
    with torch.no_grad():
        for i in range(warmup + iters):
            sync()
            start = time.perf_counter()
            detector(inputs)
            sync()
            if i >= warmup:
                times.append(time.perf_counter() - start)
    per_iter = statistics.median(times)
    return {"images_per_s": batch / per_iter, "ms_per_iter": per_iter * 1000,
            "min_ms": min(times) * 1000, "max_ms": max(times) * 1000}


# --------------------------------------------------------------------------------------------
def analyze(name: str, detector, args) -> None:
    import torch
    from fvcore.nn import flop_count_table, parameter_count_table

    print(f"==== {name}: {type(detector).__name__}")
    if "parameter" in args.tasks:
        total = sum(p.numel() for p in detector.parameters())
        trainable = sum(p.numel() for p in detector.parameters() if p.requires_grad)
        print(parameter_count_table(detector, max_depth=args.max_depth))
        print(f"parameters: {name} {total} total, {trainable} trainable")
    if "flop" in args.tasks:
        g = torch.Generator().manual_seed(0)
        images = (torch.rand(args.batch_size, 3, args.height, args.width, generator=g) * 255).to(
            next(detector.parameters()).device)
        flops = count_flops(detector, images)
        print(flop_count_table(flops, max_depth=args.max_depth))
        by_op = flops.by_operator()
        msda = sum(v for k, v in by_op.items() if k == "grid_sampler" or is_msda_op(k))
        print(f"flops: {name} {flops.total()} total at batch {args.batch_size}, {args.height}x{args.width} "
              f"({flops.total() / 1e9 / args.batch_size:.2f} GFLOPs per image); deformable-attention sampling "
              f"{msda}; not counted (elementwise and other ops without a rule): "
              f"{', '.join(sorted(k.replace('aten::', '') for k in flops.unsupported_ops())) or 'none'}")
    if "speed" in args.tasks:
        s = measure_speed(detector, args.batch_size, args.height, args.width, args.num_iters, args.warmup)
        device = next(detector.parameters()).device
        print(f"speed: {name} {s['images_per_s']:.2f} images/s on {device} (batch {args.batch_size}, "
              f"{args.height}x{args.width}; median {s['ms_per_iter']:.1f} ms/iteration, range "
              f"{s['min_ms']:.1f}-{s['max_ms']:.1f} over {args.num_iters}, {args.warmup} warm-up excluded)")


def main(argv=None) -> int:
    args = parse_args(argv)
    from tprd.engine.main import load_config
    from tprd.engine.predictor import build_detector, is_distillation_config

    cfg = load_config(args.config_file, args.opts)
    if is_distillation_config(cfg):
        parts = ["student", "teacher"] if args.part == "both" else [args.part]
    else:
        if args.part == "teacher":
            raise ValueError(f"{args.config_file} is a plain detector config: it has no teacher (drop --part teacher)")
        parts = ["student"]
    for part in parts:
        name = part if is_distillation_config(cfg) else "model"
        analyze(name, build_detector(cfg, part), args)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (FileNotFoundError, KeyError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
