"""Shared KD losses (docs/methods.md#b4, #b5) and the B3 soft Hungarian matcher."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from tprd.distill.losses import kd_detr_weighted_losses, kl_div_logits, soft_bce_pair_losses
from tprd.distill.soft_matcher import (
    inverse_permutation,
    pair_positive_targets,
    soft_hungarian_match,
    soft_hungarian_match_stages,
    soft_match_cost,
)
from tprd.distill.tprd import aligned_positive_targets, build_match_index, pad_ground_truth


def _sig(z):
    return 1.0 / (1.0 + math.exp(-z))


def _bce(z, q):
    return -(q * math.log(_sig(z)) + (1 - q) * math.log(1 - _sig(z)))


def _softmax(v):
    m = max(v)
    e = [math.exp(x - m) for x in v]
    return [x / sum(e) for x in e]


# ----------------------------------------------------------------------------------------------
# B4
# ----------------------------------------------------------------------------------------------
def test_soft_bce_hand_values():
    s_logits = torch.tensor([[0.0, 1.0], [2.0, -1.0]], dtype=torch.float64)
    t_logits = torch.tensor([[0.0, -1.0], [1.0, 3.0]], dtype=torch.float64)
    s_boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.2, 0.2, 0.2, 0.2]], dtype=torch.float64)
    t_boxes = torch.tensor([[0.6, 0.5, 0.2, 0.2], [0.6, 0.2, 0.2, 0.2]], dtype=torch.float64)
    cls = [sum(_bce(s, _sig(t)) for s, t in zip(sr, tr)) for sr, tr in zip(s_logits.tolist(), t_logits.tolist())]
    # pair 0: xyxy [.4,.4,.6,.6] vs [.5,.4,.7,.6]: inter .02, union .06, hull = union -> GIoU .02/(.06+1e-6)
    # pair 1: [.1,.1,.3,.3] vs [.5,.1,.7,.3]: disjoint, union .08, hull .6*.2=.12 -> GIoU -(.04)/(.12+1e-6)
    # (1e-6: detrex's epsilons on union and hull)
    giou = [1 - 0.02 / (0.06 + 1e-6), 1 + 0.04 / (0.12 + 1e-6)]
    l1 = [0.1, 0.4]
    per = soft_bce_pair_losses(s_logits, t_logits, s_boxes, t_boxes, reduction="none")
    assert per["class"].tolist() == pytest.approx(cls, rel=1e-12)
    assert per["l1"].tolist() == pytest.approx(l1, rel=1e-12)
    assert per["giou"].tolist() == pytest.approx(giou, rel=1e-9)
    tot = soft_bce_pair_losses(s_logits, t_logits, s_boxes, t_boxes)
    assert tot["class"].item() == pytest.approx(sum(cls), rel=1e-12)
    assert tot["l1"].item() == pytest.approx(sum(l1), rel=1e-12)
    assert tot["giou"].item() == pytest.approx(sum(giou), rel=1e-9)


def test_soft_bce_teacher_gets_no_gradient_and_empty_is_zero():
    s = torch.randn(3, 4, requires_grad=True)
    t = torch.randn(3, 4, requires_grad=True)
    sb = torch.rand(3, 4, requires_grad=True)
    tb = torch.rand(3, 4, requires_grad=True)
    out = soft_bce_pair_losses(s, t, sb, tb)
    sum(out.values()).backward()
    assert t.grad is None and tb.grad is None and s.grad is not None and sb.grad is not None
    empty = soft_bce_pair_losses(torch.zeros(0, 4), torch.zeros(0, 4), torch.zeros(0, 4), torch.zeros(0, 4))
    assert all(v.item() == 0.0 for v in empty.values())
    with pytest.raises(ValueError):
        soft_bce_pair_losses(s, t, sb, tb, reduction="mean")


# ----------------------------------------------------------------------------------------------
# B5
# ----------------------------------------------------------------------------------------------
def test_kd_detr_zero_when_equal():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 5, 3, generator=g)
    b = torch.cat([0.3 + 0.4 * torch.rand(2, 5, 2, generator=g), 0.1 + 0.2 * torch.rand(2, 5, 2, generator=g)], -1)
    out = kd_detr_weighted_losses(z, z.clone(), b, b.clone())
    assert abs(out["class"].item()) < 1e-6 and abs(out["l1"].item()) < 1e-6
    # GIoU of a box with itself is area / (area + 1e-6) with detrex's epsilon, not exactly 1
    assert 0 < out["giou"].item() < 1e-6 / (0.1 * 0.1)


def test_kd_detr_weights_normalised_per_image():
    g = torch.Generator().manual_seed(1)
    B, Q, C = 3, 6, 4
    s, t = torch.randn(B, Q, C, generator=g), torch.randn(B, Q, C, generator=g) * 3
    box = torch.rand(B, Q, 4, generator=g) * 0.2 + 0.3
    # per-query loss 1 everywhere -> (1/B) Σ_b Σ_q ŵ = 1 iff ŵ sums to 1 per image
    out = kd_detr_weighted_losses(s, t, box, box, class_loss=torch.ones(B, Q))
    assert out["class"].item() == pytest.approx(1.0, rel=1e-6)
    # loss 1 on image 1 only -> 1/B
    ind = torch.zeros(B, Q)
    ind[1] = 1
    assert kd_detr_weighted_losses(s, t, box, box, class_loss=ind)["class"].item() == pytest.approx(1 / B, rel=1e-6)
    with pytest.raises(ValueError):
        kd_detr_weighted_losses(s, t, box, box, class_loss=torch.ones(B * Q))


def test_kd_detr_stacked_stages_equal_per_stage_calls():
    g = torch.Generator().manual_seed(5)
    L, B, Q, C = 3, 2, 4, 5
    s, t = torch.randn(L, B, Q, C, generator=g), torch.randn(L, B, Q, C, generator=g)
    sb, tb = torch.rand(L, B, Q, 4, generator=g) * 0.2 + 0.3, torch.rand(L, B, Q, 4, generator=g) * 0.2 + 0.3
    cl = torch.rand(L, B, Q, generator=g)
    for override in (None, cl):
        stacked = kd_detr_weighted_losses(s, t, sb, tb, class_loss=override)
        for k in ("class", "l1", "giou"):
            assert stacked[k].shape == (L,)
            single = [kd_detr_weighted_losses(s[l], t[l], sb[l], tb[l], class_loss=None if override is None else cl[l])[k] for l in range(L)]
            assert torch.allclose(stacked[k], torch.stack(single), rtol=1e-6, atol=0)


def test_kd_detr_hand_values():
    # B = 1, Q = 2, C = 2, T = 10
    s = [[0.0, 1.0], [2.0, 0.0]]
    t = [[1.0, 3.0], [-1.0, 0.5]]
    T = 10.0
    w = [_sig(max(r)) for r in t]
    wh = [x / sum(w) for x in w]
    kl = []
    for sr, tr in zip(s, t):
        p = _softmax([x / T for x in sr])
        r = _softmax([x / T for x in tr])
        kl.append(T * T * sum(ri * math.log(ri / pi) for ri, pi in zip(r, p)))
    sb = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.2, 0.2]]], dtype=torch.float64)
    tb = torch.tensor([[[0.6, 0.5, 0.2, 0.2], [0.3, 0.3, 0.2, 0.2]]], dtype=torch.float64)
    out = kd_detr_weighted_losses(
        torch.tensor([s], dtype=torch.float64), torch.tensor([t], dtype=torch.float64), sb, tb, temperature=T
    )
    assert out["class"].item() == pytest.approx(wh[0] * kl[0] + wh[1] * kl[1], rel=1e-6)
    assert out["l1"].item() == pytest.approx(wh[0] * 0.1, rel=1e-6)
    # pair 0: inter .02, union .06 = hull; pair 1 identical boxes (area .04); detrex's 1e-6 on the union
    giou = wh[0] * (1 - 0.02 / (0.06 + 1e-6)) + wh[1] * (1 - 0.04 / (0.04 + 1e-6))
    assert out["giou"].item() == pytest.approx(giou, rel=1e-6)
    # batch of two identical images: same value (1/B normaliser)
    out2 = kd_detr_weighted_losses(
        torch.tensor([s, s], dtype=torch.float64), torch.tensor([t, t], dtype=torch.float64),
        sb.repeat(2, 1, 1), tb.repeat(2, 1, 1), temperature=T,
    )
    assert out2["class"].item() == pytest.approx(out["class"].item(), rel=1e-9)


def test_kl_div_logits_stable():
    s = torch.tensor([[1e4, -1e4, 0.0]], requires_grad=True)
    t = torch.tensor([[-1e4, 1e4, 0.0]])
    kl = kl_div_logits(t, s)
    assert kl.item() == pytest.approx(2e4, rel=1e-6)
    kl.sum().backward()
    assert torch.isfinite(s.grad).all()
    # teacher with an exactly zero probability (-inf logit) contributes 0, no NaN
    t2 = torch.tensor([[float("-inf"), 0.0, 0.0]])
    s2 = torch.tensor([[0.0, 0.0, 0.0]])
    assert kl_div_logits(t2, s2).item() == pytest.approx(math.log(1.5), rel=1e-6)


# ----------------------------------------------------------------------------------------------
# B3 soft matcher
# ----------------------------------------------------------------------------------------------
def _naive_cost(s_logits, s_boxes, t_logits, t_boxes):
    """[Ns, Nt] cost with an explicit [Ns, Nt, C] soft-label BCE and per-pair box terms."""
    Ns, Nt = s_logits.shape[0], t_logits.shape[0]
    cost = torch.zeros(Ns, Nt, dtype=torch.float64)
    for n in range(Ns):
        for m in range(Nt):
            zs, q = s_logits[n].double(), t_logits[m].double().sigmoid()
            c_soft = F.binary_cross_entropy_with_logits(zs, q, reduction="sum")
            sb = s_boxes[n].double().clamp(0, 1)
            tb = t_boxes[m].double()
            l1 = (sb - tb).abs().sum()
            a = [sb[0] - sb[2] / 2, sb[1] - sb[3] / 2, sb[0] + sb[2] / 2, sb[1] + sb[3] / 2]
            b = [tb[0] - tb[2] / 2, tb[1] - tb[3] / 2, tb[0] + tb[2] / 2, tb[1] + tb[3] / 2]
            iw = (min(a[2], b[2]) - max(a[0], b[0])).clamp(min=0)
            ih = (min(a[3], b[3]) - max(a[1], b[1])).clamp(min=0)
            inter = iw * ih
            union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
            hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
            giou = inter / (union + 1e-6) - (hull - union) / (hull + 1e-6)  # detrex's epsilons
            cost[n, m] = c_soft + 5 * l1 - 2 * giou
    return cost


def _random_preds(g, *lead, n=4, c=3, spill=False):
    logits = torch.randn(*lead, n, c, generator=g) * 2
    cxcy = torch.rand(*lead, n, 2, generator=g) * (1.4 if spill else 0.6) + (-0.2 if spill else 0.2)
    wh = torch.rand(*lead, n, 2, generator=g) * 0.3 + 0.05
    return logits, torch.cat([cxcy, wh], -1)


def test_soft_cost_matches_naive():
    g = torch.Generator().manual_seed(0)
    s_l, s_b = _random_preds(g, 2, n=5, spill=True)  # student boxes partly outside [0, 1]
    t_l, t_b = _random_preds(g, 2, n=3)
    cost = soft_match_cost(s_l, s_b, t_l, t_b)
    assert cost.shape == (2, 5, 3)
    for b in range(2):
        assert torch.allclose(cost[b].double(), _naive_cost(s_l[b], s_b[b], t_l[b], t_b[b]), rtol=1e-5, atol=1e-4)


def test_soft_matcher_is_optimal_full_permutation():
    g = torch.Generator().manual_seed(2)
    for trial in range(5):
        s_l, s_b = _random_preds(g, 3, n=4)
        t_l, t_b = _random_preds(g, 3, n=4)
        result = soft_hungarian_match(s_l, s_b, t_l, t_b)
        assert len(result) == 3
        for b, (si, ti) in enumerate(result):
            assert si.dtype == torch.long and ti.dtype == torch.long
            assert si.tolist() == [0, 1, 2, 3]  # sorted by student index, full permutation
            assert sorted(ti.tolist()) == [0, 1, 2, 3]
            cost = _naive_cost(s_l[b], s_b[b], t_l[b], t_b[b])
            best = min(itertools.permutations(range(4)), key=lambda p: sum(cost[n, p[n]].item() for n in range(4)))
            got = sum(cost[n, ti[n]].item() for n in range(4))
            assert got == pytest.approx(sum(cost[n, best[n]].item() for n in range(4)), rel=1e-5)
            assert ti.tolist() == list(best)


def test_soft_matcher_unequal_counts_and_stages():
    g = torch.Generator().manual_seed(4)
    s_l, s_b = _random_preds(g, 2, 3, n=5)
    t_l, t_b = _random_preds(g, 2, 3, n=3)
    per_stage = soft_hungarian_match_stages(s_l, s_b, t_l, t_b)
    assert len(per_stage) == 2 and all(len(s) == 3 for s in per_stage)
    for l in range(2):
        single = soft_hungarian_match(s_l[l], s_b[l], t_l[l], t_b[l])
        for (si, ti), (si2, ti2) in zip(per_stage[l], single):
            assert torch.equal(si, si2) and torch.equal(ti, ti2)
            assert si.numel() == 3 and sorted(ti.tolist()) == [0, 1, 2]
            assert si.tolist() == sorted(si.tolist()) and len(set(si.tolist())) == 3
    # equal (zero) logits make the class cost constant: the boxes decide and the matcher recovers
    # the permutation of a shuffled copy of the student boxes
    perm = torch.tensor([2, 4, 0, 1, 3])
    boxes = torch.tensor([[0.1 + 0.2 * i, 0.5, 0.1, 0.1] for i in range(5)])
    zeros = torch.zeros(1, 5, 3)
    si, ti = soft_hungarian_match(zeros, boxes[None], zeros, boxes[perm][None])[0]
    assert si.tolist() == [0, 1, 2, 3, 4]
    assert torch.equal(perm[ti], si)  # teacher ti[n] holds student n's box


def test_inverse_permutation_and_pair_targets():
    perm = torch.tensor([3, 0, 2, 1])  # student n <-> teacher perm[n]
    inv = inverse_permutation(perm, 4)
    assert inv.tolist() == [1, 3, 2, 0]
    assert inverse_permutation(torch.tensor([2, 0]), 4).tolist() == [1, -1, 0, -1]
    # teacher positives: query 2 -> GT 1 (class 7), query 3 -> GT 0 (class 4)
    match = (torch.tensor([2, 3]), torch.tensor([1, 0]))
    labels = torch.tensor([4, 7])
    pos, cls = pair_positive_targets(perm, 4, match, labels)
    assert pos.tolist() == [True, False, True, False]
    assert cls.tolist() == [4, 0, 7, 0]
    # agrees with the gather-based lookup of tprd.aligned_positive_targets
    idx = build_match_index([[match]], 4)[0]
    lab_pad, _, _ = pad_ground_truth([labels], [torch.rand(2, 4)])
    pos2, cls2 = aligned_positive_targets(idx, lab_pad, perm[None])
    assert torch.equal(pos2[0], pos) and torch.equal(cls2[0], cls)
    # a positive teacher query that is in no pair is simply absent
    pos3, cls3 = pair_positive_targets(torch.tensor([3, 0]), 4, match, labels)
    assert pos3.tolist() == [True, False] and cls3.tolist() == [4, 0]
