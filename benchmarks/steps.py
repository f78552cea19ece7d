#!/usr/bin/env python
"""Training steps before/after the MSDA Function, with and without activation checkpointing (CPU).

    python benchmarks/steps.py --rounds 3 --threads 2

Rows: the Deformable DETR R18 **student step** (``student(batch)`` in train mode + backward) and
one **distillation step** (``distiller(batch)`` + backward) of DETRDistill_TPRD and KD_DETR_TPRD
(R50 teacher -> R18 student, the full-size configs, random weights), on 2 random 512x512 images
with 7 random boxes each. Variants:

* ``before``: the grid_sample MSDA path (``set_msda_backend("grid_sample")``) and plain dropout
  (``set_lean_dropout(False)``): the code path before the MSDA kernels and the lean dropout;
* ``after``: the default backend (``"auto"``: the C++ kernel on CPU when it builds, else the
  MSDA autograd Function);
* ``after+ckpt``: the same with ``use_checkpoint=True`` on the student (the teacher runs without
  gradients, so checkpointing does not apply to it);
* ``after+enc``: the same with ``use_checkpoint="encoder"`` (only the encoder layers checkpointed);
* ``after+attn``: the same with ``use_checkpoint="encoder_attention"`` (only the attention block of
  each encoder layer checkpointed);
* ``pytorch``: the pure-PyTorch MSDA Function (the CPU path without a compiler);
* ``cpp`` and ``cpp+ckpt``: the C++ MSDA kernel asked for explicitly (``set_msda_backend("cpp")``),
  without and with ``use_checkpoint``;
* ``after+mmap``: ``after`` with glibc's mmap threshold fixed at 4 MiB (``train.cpu_mmap_threshold``,
  ``tprd/utils/malloc.py``), set at the child's start;
* ``after+trim``: ``after`` with ``malloc_trim(0)`` (glibc: return the heap's free pages to the
  system) before the forward and the backward of every encoder and decoder layer of the student: an
  experiment, not an option of the trainer;
* ``after+cache``: ``after`` with the caching CPU allocator (``train.cpu_allocator="caching"``,
  ``tprd/utils/cpu_allocator.py``: blocks of 1 MiB or more mapped on their own and reused across
  steps, at most 512 MiB of freed blocks kept), installed at the child's start.

Every (round, row, variant) runs in a fresh process: build, one untimed step, ``--steps`` timed
steps; its time is the median of those, its memory the process's peak RSS (``ru_maxrss``, which
includes the models and the inputs); the user and system CPU seconds per step (``getrusage``, median)
are reported beside the wall time, since on a loaded machine CPU time moves less than wall time. Rounds interleave the variants so that the machine's load
hits them alike. Prints a markdown table: median over rounds (min-max), and the ratio after/before.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

STUDENT = "projects/deformable_detr/configs/models/deformable_detr_r18.py"
DISTILL = "projects/deformable_detr/cfg_distill/{}/deformable_detr_r50_distill_r18_50ep.py"
ROWS = {
    "student step (Deformable DETR R18)": ("student", STUDENT),
    "DETRDistill_TPRD step": ("distill", DISTILL.format("DETRDistill_TPRD")),
    "KD_DETR_TPRD step": ("distill", DISTILL.format("KD_DETR_TPRD")),
    "MGD_TPRD step": ("distill", DISTILL.format("MGD_TPRD")),
    "CrossKD_TPRD step": ("distill", DISTILL.format("CrossKD_TPRD")),
}
VARIANTS = ("before", "after", "after+ckpt", "after+enc", "after+attn", "pytorch", "cpp", "cpp+ckpt", "after+mmap", "after+trim", "after+cache")


def build(kind: str, config: str, variant: str):
    """The model to step and its student (``use_checkpoint`` set for ``after+ckpt``)."""
    from tprd.config import LazyConfig, instantiate
    from tprd.layers.activation_checkpoint import set_layer_options
    from tprd.layers.ms_deform_attn import set_msda_backend

    backend = {"before": "grid_sample", "pytorch": "pytorch", "cpp": "cpp", "cpp+ckpt": "cpp"}.get(variant, "auto")
    set_msda_backend(backend)
    from tprd.layers.lean_dropout import set_lean_dropout

    set_lean_dropout(variant != "before")  # the old path: plain dropout keeping its float noise
    cfg = LazyConfig.load(config)
    if kind == "student":
        cfg.model.device = "cpu"
    model = instantiate(cfg.model)
    student = model.student if kind == "distill" else model
    use_checkpoint = {"+ckpt": True, "+enc": "encoder", "+attn": "encoder_attention"}.get(
        variant[variant.find("+"):] if "+" in variant else "", False)
    set_layer_options(student, use_checkpoint=use_checkpoint)
    return model.train()


def add_trim_hooks(student) -> None:
    """``malloc_trim(0)`` before the forward and the backward of every encoder/decoder layer."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")

    def trim(*_) -> None:  # a hook returning None leaves the inputs / gradients as they are
        libc.malloc_trim(0)

    for module in student.modules():
        if type(module).__name__.endswith(("EncoderLayer", "DecoderLayer")):
            module.register_forward_pre_hook(trim)
            module.register_full_backward_pre_hook(trim)


def child(args) -> None:
    import torch

    sys.path.insert(0, os.path.join(REPO, "tools"))
    from benchmark import make_batch

    if args.variant == "after+mmap":
        from tprd.utils.malloc import set_mmap_threshold

        assert set_mmap_threshold(4 * 1024 * 1024), "glibc's mallopt is needed for after+mmap"
    if args.variant == "after+cache":
        from tprd.utils import cpu_allocator

        assert cpu_allocator.enable(), "the caching CPU allocator could not be built"
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    kind, config = ROWS[args.row]
    model = build(kind, config, args.variant.replace("+trim", "").replace("+cache", ""))
    if args.variant.endswith("+trim"):
        add_trim_hooks(model.student if kind == "distill" else model)
    num_classes = int((model.student if kind == "distill" else model).num_classes)
    data = make_batch(2, 512, 7, num_classes, seed=0)

    def step():
        model.zero_grad(set_to_none=True)
        sum(model(data).values()).backward()

    step()  # warm-up
    times, user, system = [], [], []
    for _ in range(args.steps):
        before = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_SELF)
        user.append(after.ru_utime - before.ru_utime)
        system.append(after.ru_stime - before.ru_stime)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KB -> GB
    print(json.dumps({"time": statistics.median(times), "user": statistics.median(user),
                      "sys": statistics.median(system), "peak_gb": peak}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1, help="timed steps per process")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--row", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    results, loads = {}, []
    for rnd in range(args.rounds):
        for row in args.rows:
            for variant in args.variants:
                cmd = [sys.executable, __file__, "--child", "--row", row, "--variant", variant,
                       "--threads", str(args.threads), "--steps", str(args.steps)]
                env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
                out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
                if out.returncode != 0:
                    sys.exit(out.stderr[-3000:])
                rec = json.loads(out.stdout.strip().splitlines()[-1])
                results.setdefault((row, variant), []).append(rec)
                loads.append(os.getloadavg()[0])
                print(f"round {rnd} | {row} | {variant}: {rec}", file=sys.stderr, flush=True)

    def cell(values, fmt):
        return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"

    print(f"{args.threads} threads, {args.rounds} rounds x {args.steps} timed step(s), load average (1 min) "
          f"{min(loads):.1f}-{max(loads):.1f}")
    print()
    print("| step | variant | time s | user s | sys s | peak RSS GB | time / before | user+sys / before "
          "| peak RSS / before |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in args.rows:
        base = results.get((row, "before"))
        for variant in args.variants:
            recs = results[(row, variant)]
            t = [r["time"] for r in recs]
            u = [r["user"] for r in recs]
            k = [r["sys"] for r in recs]
            c = [r["user"] + r["sys"] for r in recs]
            m = [r["peak_gb"] for r in recs]
            rt = rc = rm = ""
            if base:
                rt = f"{statistics.median(t) / statistics.median(r['time'] for r in base):.2f}x"
                rc = f"{statistics.median(c) / statistics.median(r['user'] + r['sys'] for r in base):.2f}x"
                rm = f"{statistics.median(m) / statistics.median(r['peak_gb'] for r in base):.2f}x"
            print(f"| {row} | {variant} | {cell(t, '{:.2f}')} | {cell(u, '{:.2f}')} | {cell(k, '{:.2f}')} "
                  f"| {cell(m, '{:.2f}')} | {rt} | {rc} | {rm} |")


if __name__ == "__main__":
    main()
