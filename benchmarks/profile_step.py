#!/usr/bin/env python
"""torch.profiler tables of one training step: by module (forward) and by operator (CPU).

    python benchmarks/profile_step.py --what student --backend grid_sample   # before
    python benchmarks/profile_step.py --what student                          # after (default backend)
    python benchmarks/profile_step.py --what distill                          # DETRDistill_TPRD step

Setting as in ``benchmarks/steps.py``: Deformable DETR R18 student (``--what student``) or the
DETRDistill_TPRD distiller, R50 teacher -> R18 student (``--what distill``), full-size configs, random
weights, 2 random 512x512 images with 7 boxes each, train mode, ``--threads`` threads. One untimed
step, then one profiled step (``profile_memory=True``).

By module: each part's ``forward`` (or method) runs inside a ``record_function`` range: backbone,
neck, encoder (all of it), encoder MSDA (the sampling modules of the encoder layers), decoder,
criterion (incl. matching), matching, teacher forward, and ``backward``. Time is the range's wall
time on the CPU (inclusive); memory is the net CPU memory the range allocated and did not free
(for a forward part: what it leaves for backward, mostly saved activations).
"""
from __future__ import annotations

import argparse
import functools
import os
import sys

import torch
from torch.autograd.profiler import record_function

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
sys.path.insert(0, os.path.join(REPO, "tools"))

from benchmark import make_batch  # noqa: E402
from steps import DISTILL, STUDENT  # noqa: E402

PARTS = ["backbone", "neck", "encoder", "encoder MSDA", "decoder", "criterion (incl. matching)", "matching",
         "teacher forward (no grad)", "backward"]


def labelled(fn, name):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with record_function(name):
            return fn(*args, **kwargs)
    return wrapper


def label_detector(model, prefix=""):
    from tprd.layers.ms_deform_attn import MultiScaleDeformableAttention

    for attr, name in (("backbone", "backbone"), ("neck", "neck")):
        part = getattr(model, attr)
        part.forward = labelled(part.forward, prefix + name)
    enc, dec = model.transformer.encoder, model.transformer.decoder
    enc.forward = labelled(enc.forward, prefix + "encoder")
    dec.forward = labelled(dec.forward, prefix + "decoder")
    for m in enc.modules():
        if isinstance(m, MultiScaleDeformableAttention):
            m.forward = labelled(m.forward, prefix + "encoder MSDA")
    if model.criterion is not None:
        crit = model.criterion
        crit.forward = labelled(crit.forward, prefix + "criterion (incl. matching)")
        crit.matcher.forward = labelled(crit.matcher.forward, prefix + "matching")
        crit.matcher.match_stages = labelled(crit.matcher.match_stages, prefix + "matching")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--what", choices=["student", "distill"], default="student")
    parser.add_argument("--student", default=STUDENT, help="student config (--what student)")
    parser.add_argument("--method", default="DETRDistill_TPRD")
    parser.add_argument("--backend", default="auto", help="MSDA backend: auto, pytorch, grid_sample")
    parser.add_argument("--use-checkpoint", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=15)
    args = parser.parse_args()

    from tprd.config import LazyConfig, instantiate
    from tprd.layers.activation_checkpoint import set_layer_options
    from tprd.layers.ms_deform_attn import set_msda_backend

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    set_msda_backend(args.backend)
    config = args.student if args.what == "student" else DISTILL.format(args.method)
    cfg = LazyConfig.load(config)
    if args.what == "student":
        cfg.model.device = "cpu"
    model = instantiate(cfg.model).train()
    student = model.student if args.what == "distill" else model
    set_layer_options(student, use_checkpoint=args.use_checkpoint)
    label_detector(student)
    if args.what == "distill":
        model.teacher.forward_outputs = labelled(model.teacher.forward_outputs, "teacher forward (no grad)")
    data = make_batch(2, 512, 7, int(student.num_classes), seed=0)

    def step():
        model.zero_grad(set_to_none=True)
        loss = sum(model(data).values())
        with record_function("backward"):
            loss.backward()

    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        with record_function("step"):
            step()
    events = prof.key_averages()
    by_name = {e.key: e for e in events}
    total = by_name["step"].cpu_time_total
    print(f"config: {config}; backend {args.backend}; use_checkpoint {args.use_checkpoint}; "
          f"{args.threads} threads; torch {torch.__version__}; load average {os.getloadavg()[0]:.1f}")
    print()
    print("| part | calls | time s (inclusive) | share of step | net memory MB |")
    print("|---|---:|---:|---:|---:|")
    for part in PARTS:
        e = by_name.get(part)
        if e is None:
            continue
        print(f"| {part} | {e.count} | {e.cpu_time_total / 1e6:.2f} | {100 * e.cpu_time_total / total:.1f}% | "
              f"{e.cpu_memory_usage / 2**20:.0f} |")
    print(f"| **step** | 1 | {total / 1e6:.2f} | 100% | |")
    print()
    ops = [e for e in events if e.key.startswith("aten::") or "Backward" in e.key]
    ops.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    print("| operator | calls | self time s | share of step | self memory MB (alloc - free) |")
    print("|---|---:|---:|---:|---:|")
    for e in ops[: args.rows]:
        print(f"| `{e.key}` | {e.count} | {e.self_cpu_time_total / 1e6:.2f} | "
              f"{100 * e.self_cpu_time_total / total:.1f}% | {e.self_cpu_memory_usage / 2**20:.0f} |")
    print()
    ops.sort(key=lambda e: e.cpu_memory_usage, reverse=True)
    print("| operator (by memory) | calls | self memory MB (alloc - free) |")
    print("|---|---:|---:|")
    for e in [e for e in ops if e.self_cpu_memory_usage > 0][:8]:
        print(f"| `{e.key}` | {e.count} | {e.self_cpu_memory_usage / 2**20:.0f} |")


if __name__ == "__main__":
    main()
