#!/usr/bin/env python
"""Time one distillation iteration, split into its parts, next to its two lower bounds.

    python tools/benchmark.py                                   # DETRDistill_TPRD, Deformable DETR
    python tools/benchmark.py --config projects/dino/cfg_distill/KD_DETR_TPRD/dino_r50_distill_r18_4scale_12ep.py
    python tools/benchmark.py --device cuda --reps 10 --size 800

What is measured (median over ``--reps`` timed repetitions after ``--warmup`` untimed ones), on a
batch of ``--batch`` random ``--size`` x ``--size`` images with ``--gt`` random boxes each:

* **distillation iteration**: ``distiller(batch)`` (train mode) + ``backward`` of the summed losses,
  split by the Distiller's profiler (``Distiller(profile=True)``) into teacher forward (no grad),
  student forward, student GT loss, matching (teacher-GT B1 and student-teacher soft Hungarian),
  TPRD (refinement + positive lookup), sections a method times itself (D³ETR: ``attention_maps``,
  cutting the groups' maps, splatting and the attention distances; QSKD: ``attention_maps``, the
  weighted splats of its memory masks; CrossKD: ``teacher_cross_forward``, the teacher's decoder on
  the student memory) and the rest of the method losses; backward is the rest of the wall time
  after the forward.
* **student step**: the student alone, ``student(batch)`` in train mode + backward.
* **teacher forward**: ``teacher.forward_outputs`` in eval mode under ``torch.no_grad``.
* **teacher backbone + neck** (feature-only methods, whose teacher stops at its neck, docs/methods.md#diff-14):
  ``teacher.extract_features`` in eval mode under ``torch.no_grad``; the ratio
  ``iteration / (student step + teacher backbone + neck)`` is then printed as well.

The ratio ``iteration / (student step + teacher forward)`` is the distillation overhead on top of
the unavoidable work (target ≤ 1.05), and ``TPRD / iteration`` the share of the refinement. The ratio
is printed from the medians, from the minima and as the median of the per-repetition ratios (the
three measurements of a repetition run back to back, so this one is the least sensitive to load
drifts on a shared machine).
Weights are random (the models come from the config, nothing is loaded): the timing of the
matching and the refinement depends on the predictions only through the number of positives.
The optimizer step is not timed (identical for both training rows).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Dict, List

import torch

try:
    import tprd  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tprd.config import LazyConfig, instantiate  # noqa: E402
from tprd.distill.methods.base import FEATURE_NEEDS  # noqa: E402
from tprd.progress import SECONDS_PER_UNIT, progress_bar  # noqa: E402

BASE_SECTIONS = ("teacher_forward", "student_forward", "student_gt_loss", "matching", "tprd", "method_losses")
DEFAULT_CONFIG = "projects/deformable_detr/cfg_distill/DETRDistill_TPRD/deformable_detr_r50_distill_r18_50ep.py"


def make_batch(n: int, size: int, num_gt: int, num_classes: int, seed: int) -> List[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        xy = torch.rand(num_gt, 2, generator=g) * size * 0.7
        wh = torch.rand(num_gt, 2, generator=g) * size * 0.3 + 8
        out.append({
            "image": torch.rand(3, size, size, generator=g) * 255,
            "height": size,
            "width": size,
            "gt_boxes": torch.cat([xy, xy + wh], 1),
            "gt_classes": torch.randint(0, num_classes, (num_gt,), generator=g),
        })
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def distill_iteration(distiller, data, device) -> Dict[str, float]:
    distiller.zero_grad(set_to_none=True)
    sync(device)
    start = time.perf_counter()
    losses = distiller(data)
    total = sum(losses.values())
    sync(device)
    forward = time.perf_counter() - start
    total.backward()
    sync(device)
    wall = time.perf_counter() - start
    t = dict(distiller.timings)
    # sections a method times itself (e.g. D³ETR's "attention_maps"), inside its method losses
    own = {k: v for k, v in t.items() if k not in BASE_SECTIONS}
    parts = {
        "teacher_forward": t.get("teacher_forward", 0.0),
        "student_forward": t.get("student_forward", 0.0),
        "student_gt_loss": t.get("student_gt_loss", 0.0),
        "matching": t.get("matching", 0.0),
        "tprd": t.get("tprd", 0.0),
        **own,
        "method_losses_other": t.get("method_losses", 0.0) - t.get("matching", 0.0) - t.get("tprd", 0.0)
        - sum(own.values()),
        "backward": wall - forward,
    }
    parts["preprocess_other"] = forward - sum(v for k, v in parts.items() if k != "backward")
    parts["iteration"] = wall
    return parts


def main(argv=None) -> None:
    from tprd.engine.defaults import add_override_arguments, override_parser

    parser = override_parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--gt", type=int, default=7, help="GT boxes per image")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    add_override_arguments(parser)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    cfg = LazyConfig.apply_overrides(LazyConfig.load(args.config), args.opts or [])
    cfg.model.profile = True
    distiller = instantiate(cfg.model).to(device)
    student, teacher = distiller.student, distiller.teacher
    num_classes = int(student.num_classes)
    data = make_batch(args.batch, args.size, args.gt, num_classes, seed=0)

    rows: Dict[str, List[float]] = {}

    def record(name, value):
        rows.setdefault(name, []).append(value)

    def student_step():
        student.zero_grad(set_to_none=True)
        losses = student(data)
        sum(losses.values()).backward()

    def teacher_forward():
        with torch.no_grad():
            teacher.forward_outputs(teacher.preprocess(data))

    feature_only = distiller.needs <= FEATURE_NEEDS

    def teacher_features():
        with torch.no_grad():
            teacher.extract_features(teacher.preprocess(data))

    with progress_bar(args.warmup + args.reps, "benchmark", unit="rep", bar_format=SECONDS_PER_UNIT) as bar:
        for rep in range(args.warmup + args.reps):
            # interleave the measurements so that machine load affects them alike
            distiller.train()
            parts = distill_iteration(distiller, data, device)
            distiller.train()
            s = timed(student_step, device)
            distiller.eval()
            t = timed(teacher_forward, device)
            tn = timed(teacher_features, device) if feature_only else None
            bar.update(1)
            if rep < args.warmup:
                continue
            for k, v in parts.items():
                record(k, v)
            record("student_step", s)
            record("teacher_inference_forward", t)
            if tn is not None:
                record("teacher_backbone_neck", tn)

    med = {k: statistics.median(v) for k, v in rows.items()}
    best = {k: min(v) for k, v in rows.items()}
    lower = med["student_step"] + med["teacher_inference_forward"]
    print(f"config: {args.config}")
    print(f"device: {device}, threads: {args.threads}, batch {args.batch} x {args.size}x{args.size}, "
          f"{args.gt} GT/image, {args.reps} reps (+{args.warmup} warm-up), torch {torch.__version__}")
    print(f"student: {type(student).__name__} {getattr(student, 'num_queries', '?')} queries; "
          f"teacher: {type(teacher).__name__}; methods: {[m.name for m in distiller.methods]}")
    print()
    print("| part | median ms | share of iteration |")
    print("|---|---:|---:|")
    own = sorted(k for k in med if k not in BASE_SECTIONS + ("method_losses_other", "preprocess_other", "backward",
                                                               "iteration", "student_step", "teacher_inference_forward"))
    order = ["teacher_forward", "student_forward", "student_gt_loss", "matching", "tprd", *own,
             "method_losses_other", "preprocess_other", "backward", "iteration"]
    for k in order:
        print(f"| {k} | {1000 * med[k]:.1f} | {100 * med[k] / med['iteration']:.1f}% |")
    print(f"| student step (student alone, fwd+bwd) | {1000 * med['student_step']:.1f} | |")
    print(f"| teacher inference forward | {1000 * med['teacher_inference_forward']:.1f} | |")
    if feature_only:
        print(f"| teacher backbone + neck | {1000 * med['teacher_backbone_neck']:.1f} | |")
    print()
    paired = statistics.median(
        it / (st + tf) for it, st, tf in zip(rows["iteration"], rows["student_step"], rows["teacher_inference_forward"])
    )
    print(f"ratio iteration / (student step + teacher forward) = {med['iteration'] / lower:.3f} (medians), "
          f"{best['iteration'] / (best['student_step'] + best['teacher_inference_forward']):.3f} (minima), "
          f"{paired:.3f} (median of the per-repetition ratios)")
    if feature_only:
        paired_neck = statistics.median(
            it / (st + tn) for it, st, tn in zip(rows["iteration"], rows["student_step"], rows["teacher_backbone_neck"])
        )
        print(f"feature-only ratio iteration / (student step + teacher backbone+neck) = "
              f"{med['iteration'] / (med['student_step'] + med['teacher_backbone_neck']):.3f} (medians), "
              f"{best['iteration'] / (best['student_step'] + best['teacher_backbone_neck']):.3f} (minima), "
              f"{paired_neck:.3f} (median of the per-repetition ratios)")
    print(f"TPRD share of the iteration = {100 * med['tprd'] / med['iteration']:.2f}%")
    print("raw (s):", {k: [round(x, 4) for x in v] for k, v in rows.items()})


if __name__ == "__main__":
    main()
