"""TPRD refinement (docs/methods.md#tprd-refinement, #diff-3, #diff-5, #inv-1 to #inv-3) and TPRD-CKD (docs/methods.md#tprd-ckd)."""
import math

import numpy as np
import pytest
import torch

from tprd.distill.tprd import (
    aligned_positive_targets,
    build_match_index,
    decoupled_kd,
    pad_ground_truth,
    refine_teacher_predictions,
    refinement_stats,
)


# ----------------------------------------------------------------------------------------------
# Straightforward per-query reference of the 2.3 rules (written independently of the module)
# ----------------------------------------------------------------------------------------------
def _iou32(a, g):
    """IoU of two cxcywh boxes in float32 scalar arithmetic, inter / (area_a + area_g - inter + 1e-6)
    (detrex's epsilon)."""
    f = np.float32
    half = f(0.5)
    ax0, ay0, ax1, ay1 = a[0] - half * a[2], a[1] - half * a[3], a[0] + half * a[2], a[1] + half * a[3]
    gx0, gy0, gx1, gy1 = g[0] - half * g[2], g[1] - half * g[3], g[0] + half * g[2], g[1] + half * g[3]
    iw = max(f(0), min(ax1, gx1) - max(ax0, gx0))
    ih = max(f(0), min(ay1, gy1) - max(ay0, gy0))
    inter = f(iw * ih)
    union = f(f((ax1 - ax0) * (ay1 - ay0)) + f((gx1 - gx0) * (gy1 - gy0))) - inter
    return f(inter / f(union + f(1e-6)))


def _sigmoid(z):
    return 1.0 / (1.0 + math.exp(-z))


def _argmax_first(row):
    best = 0
    for i in range(1, len(row)):
        if row[i] > row[best]:
            best = i
    return best


def reference_refine(logits, boxes, matches, gt_labels, gt_boxes, skip_empty_images):
    """Per (stage, image, query) loop; returns refined logits, boxes and the chosen source stages."""
    L, B, Q, C = logits.shape
    z = logits.tolist()
    x = boxes.numpy().astype(np.float32)
    out_logits, out_boxes = logits.clone(), boxes.clone()
    pos_src = torch.full((L, B, Q), -1, dtype=torch.long)
    neg_src = torch.full((L, B, Q), -1, dtype=torch.long)
    for l in range(L):
        for b in range(B):
            if skip_empty_images and len(gt_labels[b]) == 0:
                continue
            matched = {int(q): int(j) for q, j in zip(matches[l][b][0].tolist(), matches[l][b][1].tolist())}
            gb = gt_boxes[b].numpy().astype(np.float32)
            for q in range(Q):
                best = None
                if q in matched:
                    j = matched[q]
                    c = int(gt_labels[b][j])
                    u = [_iou32(x[k, b, q], gb[j]) for k in range(l + 1)]
                    s = [_sigmoid(z[k][b][q][c]) for k in range(l + 1)]
                    for k in range(l + 1):
                        if u[k] > u[l] and s[k] > s[l] and (best is None or u[k] > u[best]):
                            best = k
                    if best is not None:
                        out_boxes[l, b, q] = boxes[best, b, q]
                        out_logits[l, b, q, c] = logits[best, b, q, c]
                        pos_src[l, b, q] = best
                else:
                    a = [_argmax_first(z[k][b][q]) for k in range(l + 1)]
                    m = [z[k][b][q][a[k]] for k in range(l + 1)]
                    for k in range(l + 1):
                        if a[k] == a[l] and m[k] < m[l] and (best is None or m[k] < m[best]):
                            best = k
                    if best is not None:
                        out_logits[l, b, q, a[l]] = logits[best, b, q, a[l]]
                        neg_src[l, b, q] = best
    return out_logits, out_boxes, pos_src, neg_src


# ----------------------------------------------------------------------------------------------
# Random cases with forced ties
# ----------------------------------------------------------------------------------------------
def random_case(seed):
    g = torch.Generator().manual_seed(seed)
    L = int(torch.randint(1, 7, (1,), generator=g))
    B = int(torch.randint(1, 4, (1,), generator=g))
    Q = int(torch.randint(1, 13, (1,), generator=g))
    C = int(torch.randint(1, 6, (1,), generator=g))
    logits = torch.randn(L, B, Q, C, generator=g) * 3
    # quantised logits: many exact ties between stages and inside rows (argmax ties)
    if seed % 3 == 0:
        logits = torch.round(logits)
    cxcy = 0.25 + 0.5 * torch.rand(L, B, Q, 2, generator=g)
    wh = 0.05 + 0.4 * torch.rand(L, B, Q, 2, generator=g)
    boxes = torch.cat([cxcy, wh], -1)
    # forced ties: copy boxes only / logits only / both from one stage to another, per query
    for _ in range(3):
        if L < 2:
            break
        src, dst = torch.randint(0, L, (2,), generator=g).tolist()
        sel = torch.rand(B, Q, generator=g) < 0.5
        mode = int(torch.randint(0, 3, (1,), generator=g))
        if mode in (0, 2):
            boxes[dst][sel] = boxes[src][sel]
        if mode in (1, 2):
            logits[dst][sel] = logits[src][sel]
    gt_labels, gt_boxes = [], []
    for b in range(B):
        G = int(torch.randint(0, min(Q, 4) + 1, (1,), generator=g))
        gt_labels.append(torch.randint(0, C, (G,), generator=g))
        gt_boxes.append(torch.cat([0.3 + 0.4 * torch.rand(G, 2, generator=g), 0.1 + 0.4 * torch.rand(G, 2, generator=g)], -1))
    matches = []
    for l in range(L):
        per_image = []
        for b in range(B):
            G = len(gt_labels[b])
            per_image.append((torch.randperm(Q, generator=g)[:G], torch.randperm(G, generator=g)))
        matches.append(per_image)
    return logits, boxes, matches, gt_labels, gt_boxes


@pytest.mark.parametrize("seed", range(48))
def test_matches_per_query_reference(seed):
    logits, boxes, matches, gt_labels, gt_boxes = random_case(seed)
    for skip in (False, True):
        ref_logits, ref_boxes, ref_pos, ref_neg = reference_refine(logits, boxes, matches, gt_labels, gt_boxes, skip)
        out_logits, out_boxes, stats = refine_teacher_predictions(
            logits, boxes, matches, gt_labels, gt_boxes, skip_empty_images=skip, return_stats=True
        )
        assert torch.equal(out_logits, ref_logits)
        assert torch.equal(out_boxes, ref_boxes)
        assert torch.equal(stats["positive_source_stage"], ref_pos)
        assert torch.equal(stats["negative_source_stage"], ref_neg)
        assert torch.equal(stats["num_positive_refined"], (ref_pos >= 0).sum((1, 2)))
        assert torch.equal(stats["num_negative_refined"], (ref_neg >= 0).sum((1, 2)))
        plain_logits, plain_boxes = refine_teacher_predictions(logits, boxes, matches, gt_labels, gt_boxes, skip)
        assert torch.equal(plain_logits, ref_logits) and torch.equal(plain_boxes, ref_boxes)


def test_forced_ties_pick_lowest_stage():
    # Four stages: stages 0 and 1 share the same (best) box, both have a higher GT-class logit than
    # stage 3, with different values -> the lowest stage (0) must provide the logit.
    gt = torch.tensor([[0.5, 0.5, 0.4, 0.4]])
    boxes = torch.tensor([[0.5, 0.5, 0.4, 0.4], [0.5, 0.5, 0.4, 0.4], [0.6, 0.5, 0.4, 0.4], [0.7, 0.5, 0.4, 0.4]])
    logits = torch.tensor([[0.0, 3.0], [0.0, 2.0], [0.0, 5.0], [0.0, 1.0]])
    L = 4
    out_logits, out_boxes, stats = refine_teacher_predictions(
        logits.view(L, 1, 1, 2), boxes.view(L, 1, 1, 4),
        [[(torch.tensor([0]), torch.tensor([0]))]] * L, [torch.tensor([1])], [gt], return_stats=True,
    )
    assert out_logits[3, 0, 0].tolist() == [0.0, 3.0]
    assert out_boxes[3, 0, 0].tolist() == boxes[0].tolist()
    # stage 1 has the same box as stage 0 (equal IoU, not strictly better); stage 2 is not beaten
    assert stats["positive_source_stage"].view(-1).tolist() == [-1, -1, -1, 0]
    # stage 2: IoU(stage 0/1) > IoU(stage 2) but logits 3, 2 < 5 -> nothing better
    assert torch.equal(out_logits[2, 0, 0], logits[2]) and torch.equal(out_boxes[2, 0, 0], boxes[2])
    # negatives: same max logit at two stages -> value copied, lowest stage reported
    neg_logits = torch.tensor([[1.0, 0.0], [1.0, 0.5], [4.0, 0.0]]).view(3, 1, 1, 2)
    out, _, st = refine_teacher_predictions(
        neg_logits, torch.rand(3, 1, 1, 4) * 0.3 + 0.2, [[(torch.zeros(0, dtype=torch.long),) * 2]] * 3,
        [torch.zeros(0, dtype=torch.long)], [torch.zeros(0, 4)], return_stats=True,
    )
    assert out[2, 0, 0].tolist() == [1.0, 0.0]
    assert st["negative_source_stage"].view(-1).tolist() == [-1, -1, 0]


def _hand_case():
    """3 stages, 1 image, 3 queries, 3 classes; one GT box of class 1 matched to query 0 at every
    stage; queries 1 and 2 are negatives."""
    gt_box = torch.tensor([[0.5, 0.5, 0.4, 0.4]])
    boxes = torch.zeros(3, 1, 3, 4)
    # query 0: IoU decreases with depth (1.0, 0.6, 1/3)
    boxes[:, 0, 0] = torch.tensor([[0.5, 0.5, 0.4, 0.4], [0.55, 0.5, 0.4, 0.4], [0.6, 0.5, 0.4, 0.4]])
    boxes[:, 0, 1] = torch.tensor([0.2, 0.2, 0.1, 0.1])
    boxes[:, 0, 2] = torch.tensor([0.8, 0.8, 0.1, 0.1])
    logits = torch.zeros(3, 1, 3, 3)
    # query 0, GT class 1 logits: 0.2 (best IoU but lower score than stage 3), 1.0, 0.5
    logits[:, 0, 0] = torch.tensor([[0.7, 0.2, -1.0], [0.1, 1.0, 0.0], [0.9, 0.5, 0.3]])
    # query 1 (negative): stage 1 argmax 1 @ 3.0, stage 2 argmax 0, stage 3 argmax 1 @ 4.0
    logits[:, 0, 1] = torch.tensor([[0.1, 3.0, -1.0], [2.5, 0.0, 0.0], [0.3, 4.0, 1.0]])
    # query 2: negative at stages 1 and 3, argmax 2 at all stages with 2.0, 1.5, 2.5
    logits[:, 0, 2] = torch.tensor([[0.0, 0.0, 2.0], [0.0, 0.0, 1.5], [0.0, 1.0, 2.5]])
    matches = [[(torch.tensor([0]), torch.tensor([0]))] for _ in range(3)]
    return logits, boxes, matches, [torch.tensor([1])], [gt_box]


def test_hand_example():
    logits, boxes, matches, gt_labels, gt_boxes = _hand_case()
    out_logits, out_boxes, stats = refine_teacher_predictions(
        logits, boxes, matches, gt_labels, gt_boxes, return_stats=True
    )
    expected = logits.clone()
    expected_boxes = boxes.clone()
    # stage 1: identity. stage 2, query 0: stage 1 has IoU 1 > 0.6 but score 0.2 < 1.0 -> unchanged.
    # stage 3, query 0: K+ = {stage 2 (IoU 0.6 > 1/3, 1.0 > 0.5)} (stage 1 has 0.2 < 0.5) -> stage 2.
    expected[2, 0, 0, 1] = 1.0
    expected_boxes[2, 0, 0] = boxes[1, 0, 0]
    # stage 3, query 1: V = {stage 1} (same class 1, 3.0 < 4.0); stage 2 predicts class 0.
    expected[2, 0, 1, 1] = 3.0
    # stage 2, query 1: argmax 0, stage 1 predicts class 1 -> unchanged.
    # query 2: stage 2: V = {} (2.0 > 1.5); stage 3: V = {stage 1 (2.0), stage 2 (1.5)} -> 1.5.
    expected[2, 0, 2, 2] = 1.5
    assert torch.equal(out_logits, expected)
    assert torch.equal(out_boxes, expected_boxes)
    assert stats["positive_refined_frac"].tolist() == [0.0, 0.0, 1.0]
    assert stats["negative_refined_frac"].tolist() == [0.0, 0.0, 1.0]
    assert stats["num_positive"].tolist() == [1, 1, 1]
    assert stats["num_negative"].tolist() == [2, 2, 2]
    assert stats["positive_source_stage"][:, 0, 0].tolist() == [-1, -1, 1]
    assert stats["negative_source_stage"][2, 0].tolist() == [-1, 0, 1]
    only = refinement_stats(logits, boxes, matches, gt_labels, gt_boxes)
    assert only["negative_refined_frac"].tolist() == [0.0, 0.0, 1.0]


def test_empty_image_negatives_and_skip_flag():
    logits = torch.tensor([[1.0, 0.0], [2.0, 0.0]]).view(2, 1, 1, 2)
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.4, 0.4, 0.2, 0.2]]).view(2, 1, 1, 4)
    empty = (torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    args = (logits, boxes, [[empty], [empty]], [torch.zeros(0, dtype=torch.long)], [torch.zeros(0, 4)])
    out_logits, out_boxes = refine_teacher_predictions(*args)
    assert out_logits[1, 0, 0].tolist() == [1.0, 0.0]  # clean default: negative rule applied
    assert torch.equal(out_boxes, boxes)
    out_logits, out_boxes = refine_teacher_predictions(*args, skip_empty_images=True)
    assert torch.equal(out_logits, logits) and torch.equal(out_boxes, boxes)


def test_single_stage_is_identity():
    logits, boxes, matches, gt_labels, gt_boxes = random_case(5)
    out_logits, out_boxes = refine_teacher_predictions(logits[:1], boxes[:1], matches[:1], gt_labels, gt_boxes)
    assert torch.equal(out_logits, logits[:1]) and torch.equal(out_boxes, boxes[:1])


def test_score_criterion_is_strict_monotone_in_logits():
    # float32 sigmoid rounds both 20 and 18 to 1.0; the implementation uses the exact ordering
    # (documented): stage 1 (better IoU, logit 20 > 18) is chosen.
    gt = torch.tensor([[0.5, 0.5, 0.4, 0.4]])
    boxes = torch.tensor([[0.5, 0.5, 0.4, 0.4], [0.6, 0.5, 0.4, 0.4]]).view(2, 1, 1, 4)
    logits = torch.tensor([[20.0], [18.0]]).view(2, 1, 1, 1)
    assert torch.sigmoid(torch.tensor(20.0)) == torch.sigmoid(torch.tensor(18.0))
    m = [[(torch.tensor([0]), torch.tensor([0]))]] * 2
    out_logits, out_boxes = refine_teacher_predictions(logits, boxes, m, [torch.tensor([0])], [gt])
    assert out_logits[1].item() == 20.0 and torch.equal(out_boxes[1], boxes[0])


@pytest.mark.parametrize("seed", [1, 2, 7, 11, 13, 29])
def test_invariants(seed):
    """Spec 9 items 1-2, checked directly on the outputs (not through the reference)."""
    logits, boxes, matches, gt_labels, gt_boxes = random_case(seed)
    before = (logits.clone(), boxes.clone(), [[(q.clone(), j.clone()) for q, j in s] for s in matches])
    out_logits, out_boxes = refine_teacher_predictions(logits, boxes, matches, gt_labels, gt_boxes)
    # inputs untouched, outputs are new tensors
    assert torch.equal(logits, before[0]) and torch.equal(boxes, before[1])
    assert all(torch.equal(q, q0) and torch.equal(j, j0) for s, s0 in zip(matches, before[2]) for (q, j), (q0, j0) in zip(s, s0))
    assert out_logits.data_ptr() != logits.data_ptr() and out_boxes.data_ptr() != boxes.data_ptr()
    # stage 1 identity
    assert torch.equal(out_logits[0], logits[0]) and torch.equal(out_boxes[0], boxes[0])
    L, B, Q, C = logits.shape
    for l in range(L):
        for b in range(B):
            matched = dict(zip(matches[l][b][0].tolist(), matches[l][b][1].tolist()))
            for q in range(Q):
                changed = (out_logits[l, b, q] != logits[l, b, q]).nonzero().view(-1).tolist()
                if q in matched:
                    c = int(gt_labels[b][matched[q]])
                    assert changed in ([], [c])  # non-target logits untouched
                    if not torch.equal(out_boxes[l, b, q], boxes[l, b, q]) or changed:
                        g = gt_boxes[b][matched[q]].numpy()
                        u_l = _iou32(boxes[l, b, q].numpy(), g)
                        ok = [
                            k for k in range(l)
                            if torch.equal(out_boxes[l, b, q], boxes[k, b, q])
                            and _iou32(boxes[k, b, q].numpy(), g) > u_l
                            and _sigmoid(logits[k, b, q, c].item()) > _sigmoid(logits[l, b, q, c].item())
                            and out_logits[l, b, q, c] == logits[k, b, q, c]
                        ]
                        assert ok, (l, b, q)
                else:
                    assert torch.equal(out_boxes[l, b, q], boxes[l, b, q])
                    assert changed in ([], [int(logits[l, b, q].argmax())])
                    if changed:
                        a = changed[0]
                        assert out_logits[l, b, q, a] < logits[l, b, q, a]


def test_bad_matches_raise():
    logits, boxes = torch.zeros(1, 1, 3, 2), torch.full((1, 1, 3, 4), 0.5)
    with pytest.raises(ValueError):
        refine_teacher_predictions(logits, boxes, [[(torch.tensor([0]), torch.tensor([1]))]], [torch.tensor([0])], [torch.rand(1, 4)])
    with pytest.raises(ValueError):
        refine_teacher_predictions(logits, boxes, [[(torch.tensor([5]), torch.tensor([0]))]], [torch.tensor([0])], [torch.rand(1, 4)])
    with pytest.raises(ValueError):
        refine_teacher_predictions(logits, boxes, [], [torch.tensor([0])], [torch.rand(1, 4)])


def test_match_index_and_aligned_targets():
    matches = [
        [(torch.tensor([2, 0]), torch.tensor([0, 1])), (torch.tensor([1]), torch.tensor([0]))],
        [(torch.tensor([3]), torch.tensor([1])), (torch.zeros(0, dtype=torch.long),) * 2],
    ]
    idx = build_match_index(matches, 4)
    assert idx.tolist() == [[[1, -1, 0, -1], [-1, 0, -1, -1]], [[-1, -1, -1, 1], [-1, -1, -1, -1]]]
    labels, boxes, num_gt = pad_ground_truth(
        [torch.tensor([7, 3]), torch.tensor([5])], [torch.rand(2, 4), torch.rand(1, 4)]
    )
    assert labels.tolist() == [[7, 3], [5, -1]] and num_gt.tolist() == [2, 1]
    pos, cls = aligned_positive_targets(idx[0], labels)
    assert pos.tolist() == [[True, False, True, False], [False, True, False, False]]
    assert cls.tolist() == [[3, 0, 7, 0], [0, 5, 0, 0]]
    # through a permutation: student position n <-> teacher query perm[n]
    perm = torch.tensor([[2, 3, 0, 1], [1, 0, 3, 2]])
    pos, cls = aligned_positive_targets(idx[0], labels, perm)
    assert pos.tolist() == [[True, False, True, False], [True, False, False, False]]
    assert cls.tolist() == [[7, 0, 3, 0], [5, 0, 0, 0]]


# ----------------------------------------------------------------------------------------------
# TPRD-CKD
# ----------------------------------------------------------------------------------------------
def _softmax(v):
    m = max(v)
    e = [math.exp(x - m) for x in v]
    return [x / sum(e) for x in e]


def _kl(r, p):
    return sum(ri * math.log(ri / pi) for ri, pi in zip(r, p) if ri > 0)


def test_ckd_hand_values():
    s = [1.0, 2.0, 0.0]
    t = [2.0, 0.0, 1.0]
    p, r = _softmax(s), _softmax(t)
    # positive, target class 0
    tckd = r[0] * math.log(r[0] / p[0]) + (1 - r[0]) * math.log((1 - r[0]) / (1 - p[0]))
    nckd = _kl(_softmax([t[1], t[2]]), _softmax([s[1], s[2]]))
    # negative
    full = _kl(r, p)
    # positive, target class 2 with alpha/beta
    tckd2 = r[2] * math.log(r[2] / p[2]) + (1 - r[2]) * math.log((1 - r[2]) / (1 - p[2]))
    nckd2 = _kl(_softmax([t[0], t[1]]), _softmax([s[0], s[1]]))
    S = torch.tensor([s, s, s], dtype=torch.float64)
    T = torch.tensor([t, t, t], dtype=torch.float64)
    out = decoupled_kd(S, T, torch.tensor([True, False, True]), torch.tensor([0, -1, 2]))
    assert out.tolist() == pytest.approx([tckd + nckd, full, tckd2 + nckd2], rel=1e-12)
    out = decoupled_kd(S, T, torch.tensor([True, False, True]), torch.tensor([0, 1, 2]), alpha=2.0, beta=0.5)
    assert out.tolist() == pytest.approx([2 * tckd + 0.5 * nckd, full, 2 * tckd2 + 0.5 * nckd2], rel=1e-12)


def test_ckd_zero_when_equal():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(20, 7, generator=g) * 4
    pos = torch.rand(20, generator=g) < 0.5
    out = decoupled_kd(z, z.clone(), pos, torch.randint(0, 7, (20,), generator=g))
    assert torch.equal(out, torch.zeros(20))


def test_ckd_two_classes_nckd_zero():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(10, 2, generator=g, dtype=torch.float64), torch.randn(10, 2, generator=g, dtype=torch.float64)
    pos = torch.ones(10, dtype=torch.bool)
    tgt = torch.randint(0, 2, (10,), generator=g)
    assert torch.equal(decoupled_kd(s, t, pos, tgt, alpha=0.0, beta=1.0), torch.zeros(10, dtype=torch.float64))
    # with C = 2, TCKD is the full binary KL
    expected = [_kl(_softmax(ti), _softmax(si)) for si, ti in zip(s.tolist(), t.tolist())]
    assert decoupled_kd(s, t, pos, tgt).tolist() == pytest.approx(expected, rel=1e-10)


def test_ckd_matches_naive_float64_with_grad():
    g = torch.Generator().manual_seed(3)
    P, C = 12, 5
    s = (torch.randn(P, C, generator=g, dtype=torch.float64) * 2).requires_grad_()
    t = torch.randn(P, C, generator=g, dtype=torch.float64) * 2
    pos = torch.rand(P, generator=g) < 0.5
    tgt = torch.randint(0, C, (P,), generator=g)
    out = decoupled_kd(s, t, pos, tgt)
    naive = []
    for i in range(P):
        p, r = s[i].softmax(-1), t[i].softmax(-1)
        if pos[i]:
            c = int(tgt[i])
            keep = [k for k in range(C) if k != c]
            tck = r[c] * torch.log(r[c] / p[c]) + (1 - r[c]) * torch.log((1 - r[c]) / (1 - p[c]))
            pn, rn = p[keep] / p[keep].sum(), r[keep] / r[keep].sum()
            naive.append(tck + (rn * torch.log(rn / pn)).sum())
        else:
            naive.append((r * torch.log(r / p)).sum())
    naive = torch.stack(naive)
    assert torch.allclose(out, naive, rtol=1e-10, atol=1e-12)
    (g1,) = torch.autograd.grad(out.sum(), s)
    (g2,) = torch.autograd.grad(naive.sum(), s)
    assert torch.allclose(g1, g2, rtol=1e-8, atol=1e-10)


def test_ckd_stable_at_saturation():
    s = torch.tensor([[1e4, -1e4, 0.0], [1e4, -1e4, 0.0], [50.0, -60.0, 0.0]], requires_grad=True)
    t = torch.tensor([[-1e4, 1e4, 0.0], [-1e4, 1e4, 0.0], [50.0, -60.0, 0.0]])
    out = decoupled_kd(s, t, torch.tensor([True, False, True]), torch.tensor([0, 0, 0]))
    assert torch.isfinite(out).all()
    # hand values: positive row: TCKD = log(1-r0) - log(1-p0) = 0 - (-1e4) and
    # NCKD = -log softmax([-1e4, 0])[0] = 1e4; negative row: -log p_1 = 2e4.
    assert out[0].item() == pytest.approx(2e4, rel=1e-6)
    assert out[1].item() == pytest.approx(2e4, rel=1e-6)
    assert out[2].item() == 0.0
    out.sum().backward()
    assert torch.isfinite(s.grad).all()
    # half precision inputs are computed in float32
    h = decoupled_kd(s.detach().half(), t.half(), torch.tensor([True, False, True]), torch.tensor([0, 0, 0]))
    assert h.dtype == torch.float32 and torch.isfinite(h).all()


def test_ckd_empty():
    out = decoupled_kd(torch.zeros(0, 4), torch.zeros(0, 4), torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.long))
    assert out.shape == (0,)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    for seed in range(6):
        logits, boxes, matches, gt_labels, gt_boxes = random_case(seed)
        cpu = refine_teacher_predictions(logits, boxes, matches, gt_labels, gt_boxes, return_stats=True)
        gpu = refine_teacher_predictions(
            logits.cuda(), boxes.cuda(), matches, [x.cuda() for x in gt_labels], [x.cuda() for x in gt_boxes], return_stats=True
        )
        assert torch.equal(cpu[0], gpu[0].cpu()) and torch.equal(cpu[1], gpu[1].cpu())
        assert gpu[2]["positive_refined_frac"].device.type == "cuda"
