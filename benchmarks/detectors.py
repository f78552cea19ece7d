"""Time each detector's forward (eval, no grad) and training forward+backward on the CPU.

    python benchmarks/detectors.py [--size 512] [--batch 2] [--repeats 2] [--threads 1] [--models ...]

Models come from the LazyConfig files (``projects/<detector>/configs/models/*_r50.py``/``_r18.py``,
official sizes: 300 queries (DINO 900), 80 classes, 6+6 layers) with their construction-time
initialisation; inputs are random 0..255 images with 3 random boxes each. Prints medians (s) as a
Markdown table. Detectors whose module or config is missing are listed as skipped.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tprd.config import LazyConfig, instantiate  # noqa: E402

MODELS = {
    "deformable_detr_r50": "projects/deformable_detr/configs/models/deformable_detr_r50.py",
    "deformable_detr_r18": "projects/deformable_detr/configs/models/deformable_detr_r18.py",
    "dab_detr_r50": "projects/dab_detr/configs/models/dab_detr_r50.py",
    "dab_detr_r18": "projects/dab_detr/configs/models/dab_detr_r18.py",
    "dino_r50": "projects/dino/configs/models/dino_r50.py",
    "dino_r18": "projects/dino/configs/models/dino_r18.py",
}


def build(config: str):
    cfg = LazyConfig.load(REPO / config)
    if "device" in cfg.model:
        cfg = LazyConfig.apply_overrides(cfg, ["model.device=cpu"])
    torch.manual_seed(0)
    return instantiate(cfg.model)


def make_inputs(batch: int, size: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    inputs = []
    for _ in range(batch):
        xy = torch.rand(3, 2, generator=g) * size * 0.6
        wh = torch.rand(3, 2, generator=g) * size * 0.3 + 8
        inputs.append({
            "image": torch.rand(3, size, size, generator=g) * 255,
            "height": size, "width": size,
            "gt_boxes": torch.cat([xy, xy + wh], 1),
            "gt_classes": torch.randint(0, 80, (3,), generator=g),
        })
    return inputs


def timed(fn, repeats: int):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times), max(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    inputs = make_inputs(args.batch, args.size)
    rows = []
    for name in args.models:
        try:
            model = build(MODELS[name])
        except Exception as e:  # module not written yet
            rows.append(f"| {name} | skipped: {type(e).__name__}: {str(e).splitlines()[0][:60]} | | |")
            continue
        params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())

        def forward():
            model.eval()
            with torch.no_grad():
                model(inputs)

        def train_step():
            model.train()
            model.zero_grad(set_to_none=True)
            losses = model(inputs)
            sum(losses.values()).backward()

        fwd = timed(forward, args.repeats)
        fb = timed(train_step, args.repeats)
        rows.append(f"| {name} | {params / 1e6:.1f}M | {fwd[0]:.2f} ({fwd[1]:.2f}-{fwd[2]:.2f}) "
                    f"| {fb[0]:.2f} ({fb[1]:.2f}-{fb[2]:.2f}) |")
        print(rows[-1], flush=True)
        del model
    print(f"\n{args.batch} x 3 x {args.size} x {args.size}, {args.threads} thread(s), torch {torch.__version__}, "
          f"median of {args.repeats} after one warm-up (min-max)\n")
    print("| model | params | eval forward s | train forward+backward s |")
    print("|---|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
