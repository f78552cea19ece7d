"""Time TPRD refinement (and TPRD-CKD / the soft matcher) at training sizes on the CPU.

    python benchmarks/tprd_refine.py [--repeats 21] [--threads N] [--device cpu]

Refinement: L=6 stages, B=8 images, Q=900 queries, C=80 classes, G≈7 GT per image (5..9), a
different random teacher–GT match per stage. Prints medians (ms) as a Markdown table.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from tprd.distill.soft_matcher import soft_hungarian_match_stages, soft_match_cost
from tprd.distill.tprd import decoupled_kd, refine_teacher_predictions


def make_inputs(L, B, Q, C, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(L, B, Q, C, generator=g) * 3).to(device)
    boxes = torch.cat([0.2 + 0.6 * torch.rand(L, B, Q, 2, generator=g), 0.05 + 0.3 * torch.rand(L, B, Q, 2, generator=g)], -1).to(device)
    counts = torch.randint(5, 10, (B,), generator=g).tolist()
    gt_labels = [torch.randint(0, C, (n,), generator=g).to(device) for n in counts]
    gt_boxes = [torch.cat([0.3 + 0.4 * torch.rand(n, 2, generator=g), 0.1 + 0.3 * torch.rand(n, 2, generator=g)], -1).to(device) for n in counts]
    # matches as a matcher returns them: CPU long tensors
    matches = [[(torch.randperm(Q, generator=g)[:n], torch.randperm(n, generator=g)) for n in counts] for _ in range(L)]
    return logits, boxes, matches, gt_labels, gt_boxes


def timed(fn, repeats, device):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), min(times), max(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    L, B, Q, C = 6, 8, 900, 80
    logits, boxes, matches, gt_labels, gt_boxes = make_inputs(L, B, Q, C, device)

    rows = []
    rows.append(("refine_teacher_predictions (L=6,B=8,Q=900,C=80,G≈7)",
                 timed(lambda: refine_teacher_predictions(logits, boxes, matches, gt_labels, gt_boxes), args.repeats, device)))
    rows.append(("  same, return_stats=True",
                 timed(lambda: refine_teacher_predictions(logits, boxes, matches, gt_labels, gt_boxes, return_stats=True), args.repeats, device)))
    rows.append(("  same, skip_empty_images=True",
                 timed(lambda: refine_teacher_predictions(logits, boxes, matches, gt_labels, gt_boxes, skip_empty_images=True), args.repeats, device)))

    # TPRD-CKD forward + backward over all B·Q pairs of one stage
    P = B * Q
    g = torch.Generator().manual_seed(1)
    s = (torch.randn(P, C, generator=g) * 3).to(device).requires_grad_()
    t = (torch.randn(P, C, generator=g) * 3).to(device)
    pos = (torch.rand(P, generator=g) < 0.01).to(device)
    tgt = torch.randint(0, C, (P,), generator=g).to(device)

    def ckd():
        decoupled_kd(s, t, pos, tgt).sum().backward()

    rows.append((f"decoupled_kd fwd+bwd (P={P}, C={C})", timed(ckd, args.repeats, device)))

    # soft matcher, all 6 stages of B=8 images with 300 student / 300 teacher queries
    N = 300
    sl, sb = logits[:, :, :N], boxes[:, :, :N]
    tl, tb = logits[:, :, N:2 * N].flip(2), boxes[:, :, N:2 * N].flip(2)
    rows.append(("soft_match_cost only (L=6,B=8,N=300,C=80)",
                 timed(lambda: soft_match_cost(sl, sb, tl, tb), args.repeats, device)))
    rows.append(("soft_hungarian_match_stages (L=6,B=8,N=300,C=80), cost + 48 scipy LSAs",
                 timed(lambda: soft_hungarian_match_stages(sl, sb, tl, tb), max(3, args.repeats // 3), device)))

    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, repeats {args.repeats}\n")
    print("| what | median ms | min ms | max ms |")
    print("|---|---:|---:|---:|")
    for name, (med, lo, hi) in rows:
        print(f"| {name} | {med:.2f} | {lo:.2f} | {hi:.2f} |")


if __name__ == "__main__":
    main()
