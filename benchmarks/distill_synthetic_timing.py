#!/usr/bin/env python
"""Per-iteration cost of the runs of ``tools/distill_benchmark.py``, to size its budgets.

    OMP_NUM_THREADS=1 python benchmarks/distill_synthetic_timing.py [--detector deformable_detr] [--steps 10]

Builds each run of the plan (teacher, student alone, every method) from the benchmark's own
configs and overrides, runs ``--steps`` training steps after two warm-up steps and evaluates
``--eval-images`` validation images, in interleaved rounds (``--rounds``). Reported per run: the
median over rounds of the **CPU** seconds per training step and per evaluated image (process time,
all threads): on the shared machine wall time is inflated by the other processes, CPU time much
less; on a quiet machine with one thread, wall time is about CPU time.
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

import torch  # noqa: E402

import distill_benchmark as bench  # noqa: E402
from tprd.config import instantiate  # noqa: E402
from tprd.engine.main import load_config  # noqa: E402


def build(run):
    overrides = [o for o in run.overrides if not o.startswith("train.init_checkpoint=")]
    cfg = load_config(str(run.config), overrides)
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    return cfg, model, optimizer, iter(instantiate(cfg.dataloader.train))


def train_steps(model, optimizer, data, steps):
    model.train()
    start = time.process_time()
    for _ in range(steps):
        loss = sum(model(next(data)).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return (time.process_time() - start) / steps


@torch.no_grad()
def eval_images(cfg, model, n):
    model.eval()
    loader = instantiate(cfg.dataloader.test)
    start = time.process_time()
    for batch in itertools.islice(loader, n):
        model(batch)
    return (time.process_time() - start) / n


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--detector", default="deformable_detr", choices=bench.DETECTORS)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--eval-images", type=int, default=10)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("/tmp/distill_synthetic_timing"))
    a = p.parse_args()
    args = bench.parse_args(["--out", str(a.out), "--detector", a.detector,
                             "dataloader.train.dataset.names=synthetic_train",
                             "dataloader.test.dataset.names=synthetic_val"])
    plan = bench.build_plan(args, bench.budget_for(a.detector, "quick"))
    runs = [plan["teacher"]] + plan["runs"]
    built = {r.method: build(r) for r in runs}
    for cfg, model, opt, data in built.values():
        train_steps(model, opt, data, 2)  # warm-up
    step = {m: [] for m in built}
    image = {m: [] for m in built}
    for _ in range(a.rounds):
        for m, (cfg, model, opt, data) in built.items():
            step[m].append(train_steps(model, opt, data, a.steps))
            image[m].append(eval_images(cfg, model, a.eval_images))
    print(f"threads {torch.get_num_threads()}, {a.rounds} interleaved rounds of {a.steps} steps, batch "
          f"{bench.budget_for(a.detector, 'quick').batch}")
    print("| run | CPU s / train step (median; rounds) | CPU s / val image |")
    print("|---|---|---|")
    for m in built:
        print(f"| {m} | {statistics.median(step[m]):.3f} ({', '.join(f'{v:.3f}' for v in step[m])}) | "
              f"{statistics.median(image[m]):.3f} |")


if __name__ == "__main__":
    main()
