#!/usr/bin/env python
"""One command that checks the GPU path of the toolbox and writes ``benchmarks/gpu.md``.

    python tools/gpu_check.py                 # on a CUDA machine; about 5-8 minutes on one GPU
    python tools/gpu_check.py --quick         # fewer rounds and steps (about 2-3 minutes)

It runs, in order, each part with its own time limit (a part that fails or runs out of time is
reported in the table, and the rest still runs):

1. **CUDA tests**: the tests that are skipped without CUDA (``tests/test_cuda.py``: the Triton
   kernel against the PyTorch path on the GPU, its first-use check, a detector step on the GPU
   against the CPU; ``tests/test_tprd.py::test_cuda_matches_cpu``).
2. **MSDA on CUDA**: ``benchmarks/msda.py --device cuda`` with the grid_sample, pytorch and triton
   backends, forward and forward+backward, time and peak memory, at 512x512 and 800x1333.
3. **Training steps**: per detector (Deformable DETR, DAB-DETR, DINO, RT-DETRv2) one student step (R18) and one
   distillation step (KD_DETR_TPRD, R50 teacher -> R18 student; RT-DETRv2: R50vd -> R18vd) on two random 800x800 images with
   random weights, in fp32, fp16 AMP and bf16 AMP: median time of the timed steps, peak memory
   (``torch.cuda.max_memory_allocated``), whether every loss was finite.
4. **Two GPUs** (only when two are visible): ``tools/train_net.py --num-gpus 2`` (NCCL) on the
   synthetic Deformable DETR KD_DETR_TPRD config for a few iterations.

On a machine without CUDA it says so and exits with status 0 without running anything.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

DETECTORS = {
    "Deformable DETR": ("projects/deformable_detr/configs/models/deformable_detr_r18.py",
                        "projects/deformable_detr/cfg_distill/KD_DETR_TPRD/deformable_detr_r50_distill_r18_50ep.py"),
    "DAB-DETR": ("projects/dab_detr/configs/models/dab_detr_r18.py",
                 "projects/dab_detr/cfg_distill/KD_DETR_TPRD/dab_detr_r50_distill_r18_50ep.py"),
    "DINO": ("projects/dino/configs/models/dino_r18.py",
             "projects/dino/cfg_distill/KD_DETR_TPRD/dino_r50_distill_r18_4scale_12ep.py"),
    "RT-DETRv2": ("projects/rt_detr/configs/models/rtdetrv2_r18vd.py",
                  "projects/rt_detr/cfg_distill/KD_DETR_TPRD/rtdetrv2_r50vd_distill_r18vd_coco.py"),
}
PRECISIONS = ("fp32", "fp16", "bf16")
TWO_GPU_CONFIG = "projects/deformable_detr/cfg_distill/KD_DETR_TPRD/deformable_detr_r50_distill_r18_synthetic.py"


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def _run(cmd, timeout: float):
    """``(returncode, stdout, stderr, seconds)``; returncode None when it ran out of time."""
    start = time.perf_counter()
    try:
        out = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
        return out.returncode, out.stdout, out.stderr, time.perf_counter() - start
    except subprocess.TimeoutExpired as exc:
        text = lambda b: b.decode(errors="replace") if isinstance(b, bytes) else (b or "")  # noqa: E731
        return None, text(exc.stdout), text(exc.stderr), time.perf_counter() - start


def _tail(text: str, n: int = 6) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return "\n".join(lines[-n:])


# ------------------------------------------------------------------------------------ parts
def part_tests(timeout: float) -> list:
    cmd = [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider",
           "tests/test_cuda.py", "tests/test_tprd.py::test_cuda_matches_cpu"]
    code, out, err, secs = _run(cmd, timeout)
    lines = ["## CUDA tests", "", f"Command: `{' '.join(cmd[1:])}` ({secs:.0f} s)", ""]
    if code is None:
        lines += [f"**Ran out of time** ({timeout:.0f} s).", ""]
    results = [line for line in out.splitlines() if line.startswith(("PASSED", "FAILED", "SKIPPED", "ERROR"))]
    lines += ["| test | result |", "|---|---|"]
    for line in results:
        verdict, _, name = line.partition(" ")
        lines.append(f"| `{name.split(' - ')[0]}` | {verdict} |")
    summary = _tail(out, 1)
    lines += ["", f"Summary: {summary}" + ("" if code == 0 else f" (exit status {code})"), ""]
    if code not in (0,):
        lines += ["```", _tail(out + "\n" + err, 30), "```", ""]
    return lines


def part_msda(rounds: int, timeout: float) -> list:
    cmd = [sys.executable, "benchmarks/msda.py", "--device", "cuda", "--impls", "grid_sample", "pytorch", "triton",
           "--sizes", "512", "800", "--rounds", str(rounds)]
    code, out, err, secs = _run(cmd, timeout)
    lines = ["## MSDA alone on CUDA", "", f"Command: `{' '.join(cmd[1:])}` ({secs:.0f} s). Forward = one call with "
             "grad enabled; forward+backward; memory = `max_memory_allocated` above the inputs; median (min-max).", ""]
    if code == 0:
        lines += [out.strip(), ""]
    else:
        lines += [f"**Failed** (exit status {code}):", "```", _tail(out + "\n" + err, 30), "```", ""]
    return lines


def step_child(detector: str, kind: str, precisions: str, steps: int, device: str = "cuda", size: int = 800) -> None:
    """The (detector, student|distill) measurements of every precision in ``precisions`` (comma
    separated), one model and one process for all of them; prints one JSON line per precision (an
    ``"error"`` line for a precision that fails, and the next one still runs). ``device``/``size``
    exist for a dry run on a CPU (``--device cpu --size 128``)."""
    import torch

    sys.path.insert(0, os.path.join(REPO, "tools"))
    from benchmark import make_batch
    from tprd.config import LazyConfig, instantiate

    student_cfg, distill_cfg = DETECTORS[detector]
    cfg = LazyConfig.load(os.path.join(REPO, student_cfg if kind == "student" else distill_cfg))
    if kind == "student" and "device" in cfg.model:
        cfg.model.device = None  # the student configs may place the model themselves
    torch.manual_seed(0)
    model = instantiate(cfg.model).to(device).train()
    num_classes = int((model.student if kind == "distill" else model).num_classes)
    data = make_batch(2, size, 7, num_classes, seed=0)
    on_cuda = torch.device(device).type == "cuda"

    def sync():
        if on_cuda:
            torch.cuda.synchronize()

    for precision in precisions.split(","):
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
        finite = True

        def step():
            nonlocal finite
            model.zero_grad(set_to_none=True)
            with torch.autocast(torch.device(device).type, dtype=dtype or torch.float32, enabled=dtype is not None):
                losses = model(data)
            finite = finite and all(bool(torch.isfinite(v.detach().float()).all()) for v in losses.values())
            total = sum(v.float() for v in losses.values())
            (total * 1024.0 if precision == "fp16" else total).backward()  # a fixed loss scale for fp16

        try:
            step()  # warm-up (kernel compilation, cudnn choices)
            sync()
            if on_cuda:
                torch.cuda.reset_peak_memory_stats()
            times = []
            for _ in range(steps):
                start = time.perf_counter()
                step()
                sync()
                times.append(time.perf_counter() - start)
            peak = torch.cuda.max_memory_allocated() / 2**30 if on_cuda else float("nan")
            record = {"precision": precision, "time": statistics.median(times), "peak_gb": peak, "finite": finite}
        except Exception as exc:  # reported in the table; the next precision still runs
            record = {"precision": precision, "error": f"{type(exc).__name__}: {exc}"[:300]}
        print(json.dumps(record), flush=True)


def part_steps(steps: int, timeout_each: float, deadline: float) -> list:
    lines = ["## Training steps on CUDA", "",
             f"Two random 800x800 images (7 boxes each), random weights; one warm-up step, then the median of {steps} "
             "timed steps; peak = `max_memory_allocated` during the timed steps; finite = every loss finite in every "
             "step. Student = the R18 detector (RT-DETRv2: R18vd); distillation = KD_DETR_TPRD, R50 teacher -> R18 "
             "student (RT-DETRv2: R50vd -> R18vd). fp16 uses a fixed loss scale of 1024.", "",
             "| detector | step | precision | time s | peak memory GB | losses finite |", "|---|---|---|---:|---:|---|"]
    for detector in DETECTORS:
        for kind in ("student", "distill"):
            label = "student step" if kind == "student" else "distillation step (KD_DETR_TPRD)"
            left = deadline - time.perf_counter()
            if left < 30:
                lines += [f"| {detector} | {label} | {p} | not run | | the check's 10-minute budget |" for p in PRECISIONS]
                continue
            cmd = [sys.executable, os.path.abspath(__file__), "--child", detector, kind, ",".join(PRECISIONS),
                   "--steps", str(steps)]
            code, out, err, _ = _run(cmd, min(timeout_each, left))
            records = {}
            for line in out.splitlines():
                if line.startswith("{"):
                    rec = json.loads(line)
                    records[rec.get("precision")] = rec
            for precision in PRECISIONS:
                rec = records.get(precision)
                if rec is not None and "error" not in rec:
                    lines.append(f"| {detector} | {label} | {precision} | {rec['time']:.3f} | {rec['peak_gb']:.2f} | "
                                 f"{'yes' if rec['finite'] else '**no**'} |")
                else:
                    why = rec["error"] if rec is not None else (
                        "out of time" if code is None else _tail(err, 1) or f"exit status {code}")
                    lines.append(f"| {detector} | {label} | {precision} | failed | | {why.replace('|', '/')[:200]} |")
                print(lines[-1], flush=True)
    return lines + [""]


def part_two_gpus(timeout: float) -> list:
    import torch

    lines = ["## Two GPUs (NCCL)", ""]
    if torch.cuda.device_count() < 2:
        return lines + [f"Skipped: {torch.cuda.device_count()} GPU visible.", ""]
    out_dir = os.path.join(REPO, "output", "gpu_check_two_gpus")
    cmd = [sys.executable, "tools/train_net.py", "--num-gpus", "2", "--config-file", TWO_GPU_CONFIG,
           "train.device=cuda", "train.max_iter=10", "train.log_period=1", "dataloader.evaluator=None",
           f"train.output_dir={out_dir}"]
    code, out, err, secs = _run(cmd, timeout)
    lines += [f"Command: `{' '.join(cmd[1:])}` ({secs:.0f} s)", ""]
    metrics = os.path.join(out_dir, "metrics.json")
    if code == 0 and os.path.isfile(metrics):
        rows = [json.loads(line) for line in open(metrics) if line.strip()]
        last = rows[-1]
        finite = all(math.isfinite(v) for r in rows for k, v in r.items() if k.startswith(("loss", "distill_")))
        lines += [f"Finished {len(rows)} iterations; losses finite: {'yes' if finite else '**no**'}; last total loss "
                  f"{last.get('total_loss', float('nan')):.4f}.", ""]
    else:
        lines += [f"**Failed** (exit status {code}):", "```", _tail(out + "\n" + err, 30), "```", ""]
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=os.path.join(REPO, "benchmarks", "gpu.md"))
    parser.add_argument("--quick", action="store_true", help="1 MSDA round and 2 timed steps")
    parser.add_argument("--child", nargs=3, metavar=("DETECTOR", "KIND", "PRECISIONS"), help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=800, help=argparse.SUPPRESS)
    args = parser.parse_args()

    import torch

    if args.child:
        step_child(*args.child, steps=args.steps or 3, device=args.device, size=args.size)
        return 0
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device is available on this machine (torch.cuda.is_available() is False); "
              "nothing was run and benchmarks/gpu.md was not written. Run this on a machine with an NVIDIA GPU.")
        return 0

    started = time.perf_counter()
    rounds, steps = (1, 2) if args.quick else (3, 3)
    name = torch.cuda.get_device_name(0)
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = "not installed"
    header = [
        "# GPU check (`tools/gpu_check.py`)", "",
        f"Run {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on {torch.cuda.device_count()} x {name} "
        f"(torch {torch.__version__}, CUDA {torch.version.cuda}, Triton {triton_version}).", "",
    ]
    sections = []

    def write(footer):
        # written after every part (atomically), so a check stopped from outside keeps what it measured
        text = "\n".join(header + sections + footer)
        tmp = args.output + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, args.output)
        return text

    for title, fn in (("tests", lambda: part_tests(150)), ("msda", lambda: part_msda(rounds, 150)),
                      ("steps", lambda: part_steps(steps, 150, started + 500)), ("two GPUs", lambda: part_two_gpus(90))):
        print(f"gpu_check: {title} ...", flush=True)
        try:
            sections += fn()
        except Exception as exc:  # report and go on with the next part
            sections += [f"## {title}", "", f"**Failed**: {type(exc).__name__}: {exc}", ""]
        write([f"(The check was still running: the parts after {title!r} are missing.)", ""])
    total = time.perf_counter() - started
    print(write([f"Total time of the check: {total / 60:.1f} min.", ""]))
    print(f"gpu_check: written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
