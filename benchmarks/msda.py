#!/usr/bin/env python
"""Multi-scale deformable attention alone: backends side by side at a detector's encoder shapes.

    python benchmarks/msda.py --threads 2 --rounds 3                     # CPU: grid_sample vs pytorch
    python benchmarks/msda.py --device cuda --impls grid_sample pytorch triton --rounds 5   # GPU
    python benchmarks/msda.py --threads 1 --impls cpp_baseline cpp --rounds 5     # C++: baseline vs AVX2 build

The encoder's call: ``Q = S`` queries (every token of the 4 levels at strides 8, 16, 32, 64 of a
``--size`` image), batch 2, 8 heads x 32 channels, 4 levels x 4 points, locations spread around
each query's own position (offsets of a few pixels, as after training) and softmax weights.

Per round and backend, a fresh process (CPU) builds the inputs, runs one untimed forward+backward,
then times one forward (grad enabled, as in training) and one forward+backward (on CUDA the median
of 10 of each); the rounds interleave the backends so that load drifts hit them alike. Memory: on CPU the peak RSS of the
process above its RSS once the inputs exist (``ru_maxrss`` - RSS before the first call); on CUDA
``torch.cuda.max_memory_allocated`` above the inputs. Prints a markdown table (median and min-max).
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

SHAPES = {512: [(64, 64), (32, 32), (16, 16), (8, 8)], 800: [(100, 167), (50, 84), (25, 42), (13, 21)]}
SIZE_NAMES = {512: "512x512", 800: "800x1333"}


def encoder_inputs(size: int, device: str, batch: int = 2, heads: int = 8, dh: int = 32, points: int = 4):
    """Value, shapes, starts, locations and weights of one encoder layer's MSDA call."""
    import torch

    g = torch.Generator().manual_seed(0)
    hw = SHAPES[size]
    shapes = torch.tensor(hw)
    sizes = shapes.prod(1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    num = int(sizes.sum())
    levels = len(hw)
    value = torch.randn(batch, num, heads, dh, generator=g)
    # each query's reference = its own cell centre, mapped to every level; offsets of ~2 pixels
    centres = []
    for h, w in hw:
        ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
        centres.append(torch.stack([xs.reshape(-1), ys.reshape(-1)], -1))
    ref = torch.cat(centres)[None, :, None, None, None, :]  # [1,Q,1,1,1,2]
    scale = torch.tensor([[1.0 / w, 1.0 / h] for h, w in hw]).view(1, 1, 1, levels, 1, 2)
    loc = ref + torch.randn(batch, num, heads, levels, points, 2, generator=g) * 2.0 * scale
    weights = torch.randn(batch, num, heads, levels * points, generator=g).softmax(-1)
    weights = weights.view(batch, num, heads, levels, points)
    return [t.to(device) for t in (value, shapes, starts, loc, weights)]


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(args) -> None:
    import torch

    from tprd.layers.ms_deform_attn import multi_scale_deformable_attention

    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    value, shapes, starts, loc, weights = encoder_inputs(args.size, args.device)
    leaves = [t.requires_grad_(True) for t in (value, loc, weights)]

    def sync():
        if cuda:
            torch.cuda.synchronize()

    backend = args.impl
    if args.impl == "cpp_baseline":  # the C++ kernel's build without AVX2 (what CPUs without it get)
        from tprd.layers import msda_cpp

        msda_cpp._EXTENSION = msda_cpp._build("tprd_msda_cpu", msda_cpp._BASE_FLAGS)
        backend = "cpp"

    def forward():
        return multi_scale_deformable_attention(leaves[0], shapes, starts, leaves[1], leaves[2], backend=backend)

    def fwd_bwd():
        for t in leaves:
            t.grad = None
        forward().sum().backward()

    if cuda:
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = current_rss_mb()
    fwd_bwd()  # warm-up (and the memory peak: the same work as the timed call)
    sync()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base)
    # one timed call on CPU (seconds each); on CUDA the median of 10 (a call takes milliseconds)
    repeats = 10 if cuda else 1

    def timed(fn):
        times = []
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    t_fwd = timed(forward)
    t_fb = timed(fwd_bwd)
    print(json.dumps({"forward": t_fwd, "fwd_bwd": t_fb, "peak_mb": peak}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--impls", nargs="+", default=["grid_sample", "pytorch"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[512, 800])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    rows = {}
    loads = []
    for rnd in range(args.rounds):
        for size in args.sizes:
            for impl in args.impls:
                cmd = [sys.executable, __file__, "--child", "--impl", impl, "--size", str(size),
                       "--device", args.device, "--threads", str(args.threads)]
                env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
                out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
                if out.returncode != 0:
                    sys.exit(out.stderr[-3000:])
                rec = json.loads(out.stdout.strip().splitlines()[-1])
                rows.setdefault((size, impl), []).append(rec)
                loads.append(os.getloadavg()[0])
                print(f"round {rnd} {SIZE_NAMES[size]} {impl}: {rec}", file=sys.stderr)

    def cell(values, scale=1.0, fmt="{:.3f}"):
        v = [x * scale for x in values]
        return f"{fmt.format(statistics.median(v))} ({fmt.format(min(v))}-{fmt.format(max(v))})"

    print(f"device {args.device}, {args.threads} threads, {args.rounds} rounds, load average (1 min) "
          f"{min(loads):.1f}-{max(loads):.1f}")
    print()
    # seconds on CPU, milliseconds on CUDA (a call takes a few)
    unit, scale = ("ms", 1000.0) if args.device == "cuda" else ("s", 1.0)
    print(f"| encoder shapes | backend | forward {unit} | forward+backward {unit} | peak memory MB | fwd+bwd speed-up |")
    print("|---|---|---:|---:|---:|---:|")
    for size in args.sizes:
        ref = statistics.median(r["fwd_bwd"] for r in rows[(size, args.impls[0])])
        for impl in args.impls:
            recs = rows[(size, impl)]
            fb = [r["fwd_bwd"] for r in recs]
            print(f"| {SIZE_NAMES[size]} | {impl} | {cell([r['forward'] for r in recs], scale)} | {cell(fb, scale)} | "
                  f"{cell([r['peak_mb'] for r in recs], fmt='{:.0f}')} | {ref / statistics.median(fb):.2f}x |")


if __name__ == "__main__":
    main()
