#!/usr/bin/env python
"""Loss curves and AP over iterations from the ``metrics.json`` of one or several runs.

    python tools/plot_metrics.py output/run_a output/run_b --out curves.png \
        [--keys total_loss loss_class bbox/AP] [--smooth 20] [--labels A B]

Each ``RUN_DIR`` (or a ``metrics.json`` path) is one line per panel, labelled with the folder name
(or ``--labels``); one panel per key. Loss keys (names containing ``loss``) are smoothed with a
moving average over ``--smooth`` logged points (the raw values are drawn faint); evaluation keys
(``bbox/AP`` ...) are drawn as points joined by lines, unsmoothed. Default keys: ``total_loss`` and
``bbox/AP``. A key a run does not have is skipped for that run; a key no run has is an error.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Sequence, Tuple


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="output folders (or metrics.json files)")
    p.add_argument("--out", required=True, help="image to write (.png, .pdf, .svg)")
    p.add_argument("--keys", nargs="+", default=["total_loss", "bbox/AP"], help="scalars to plot, one panel each")
    p.add_argument("--smooth", type=int, default=20, help="moving-average window for loss keys (1 = none)")
    p.add_argument("--labels", nargs="+", default=None, help="legend label per run (default: folder names)")
    return p.parse_args(argv)


def metrics_file(run: str) -> str:
    path = os.path.join(run, "metrics.json") if os.path.isdir(run) else run
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} does not exist; pass a training output folder (it holds metrics.json) "
                                "or the metrics.json file itself")
    return path


def read_metrics(path: str) -> List[Dict[str, float]]:
    """The records of a ``metrics.json`` (one JSON object per line); a later line for an iteration
    updates the earlier one (files of resumed runs, or written before one line per iteration)."""
    by_iter: Dict[int, Dict[str, float]] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {n}: not a JSON object ({e}); is this a metrics.json?") from e
            if "iteration" not in record:
                raise ValueError(f"{path}, line {n}: no 'iteration' field; is this a metrics.json?")
            by_iter.setdefault(int(record["iteration"]), {}).update(record)
    return [by_iter[i] for i in sorted(by_iter)]


def series(records: Sequence[Dict[str, float]], key: str) -> Tuple[List[int], List[float]]:
    pairs = [(int(r["iteration"]), float(r[key])) for r in records if key in r]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def moving_average(values: Sequence[float], window: int) -> List[float]:
    """Mean of the last ``window`` values at each point (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.labels is not None and len(args.labels) != len(args.runs):
        raise ValueError(f"--labels gives {len(args.labels)} names for {len(args.runs)} runs")
    runs = [read_metrics(metrics_file(r)) for r in args.runs]
    labels = args.labels or [os.path.basename(os.path.normpath(r if os.path.isdir(r) else os.path.dirname(r)))
                             for r in args.runs]
    absent = [k for k in args.keys if not any(series(rec, k)[0] for rec in runs)]
    if absent:
        known = sorted({k for rec in runs for r in rec for k in r if k != "iteration"})
        raise KeyError(f"no run has {absent} in its metrics.json; keys there: {', '.join(known[:30])}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.keys), figsize=(5 * len(args.keys), 3.8), squeeze=False)
    for ax, key in zip(axes[0], args.keys):
        for i, (records, label) in enumerate(zip(runs, labels)):
            its, values = series(records, key)
            if not its:
                continue
            color = f"C{i % 10}"
            if "loss" in key and args.smooth > 1:
                ax.plot(its, values, color=color, alpha=0.25, linewidth=0.8)
                ax.plot(its, moving_average(values, args.smooth), color=color, label=label)
            else:
                ax.plot(its, values, color=color, marker="o", markersize=3, label=label)
        ax.set_title(key + (f" (moving average of {args.smooth})" if "loss" in key and args.smooth > 1 else ""))
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out, dpi=100)
    plt.close(fig)
    print(f"wrote {args.out}: {', '.join(args.keys)} for {len(runs)} run(s)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
