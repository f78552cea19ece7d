"""Deformable-attention splatting B6 (docs/methods.md#b6) against a per-sample loop, and the mass
invariant of docs/methods.md#inv-7."""
import math

import pytest
import torch

from tprd.distill.splat import splat_deformable_attention


def _levels(shapes):
    spatial = torch.tensor(shapes, dtype=torch.long)
    starts = torch.cat([spatial.new_zeros(1), spatial.prod(1).cumsum(0)[:-1]])
    return spatial, starts


def _loop_splat(loc, weights, shapes, starts, reduce):
    """Rule B6 written out sample by sample and corner by corner."""
    B, Q, M, L, P, _ = loc.shape
    S = sum(h * w for h, w in shapes)
    out = torch.zeros(B, M if reduce == "head" else Q, S, dtype=torch.float64)
    for b in range(B):
        for q in range(Q):
            for m in range(M):
                for l in range(L):
                    H, W = shapes[l]
                    for p in range(P):
                        X = float(loc[b, q, m, l, p, 0]) * W
                        Y = float(loc[b, q, m, l, p, 1]) * H
                        x0, y0 = math.floor(X), math.floor(Y)
                        a = float(weights[b, q, m, l, p])
                        corners = [
                            (x0, y0, (x0 + 1 - X) * (y0 + 1 - Y)),
                            (x0, y0 + 1, (x0 + 1 - X) * (Y - y0)),
                            (x0 + 1, y0, (X - x0) * (y0 + 1 - Y)),
                            (x0 + 1, y0 + 1, (X - x0) * (Y - y0)),
                        ]
                        for col, row, f in corners:
                            if 0 <= col < W and 0 <= row < H:
                                r = m if reduce == "head" else q
                                out[b, r, row * W + col + int(starts[l])] += a * f
    return out


@pytest.mark.parametrize("reduce", ["head", "query"])
@pytest.mark.parametrize("seed", [0, 1])
def test_splat_matches_per_sample_loop(reduce, seed):
    g = torch.Generator().manual_seed(seed)
    B = int(torch.randint(1, 3, (1,), generator=g))
    Q = int(torch.randint(2, 6, (1,), generator=g))
    M = int(torch.randint(1, 4, (1,), generator=g))
    P = int(torch.randint(1, 4, (1,), generator=g))
    shapes = [(5, 7), (3, 4), (2, 2)][: 2 + seed]
    L = len(shapes)
    spatial, starts = _levels(shapes)
    # spread well beyond [0,1] so that neighbours fall outside the map on every side
    loc = torch.rand(B, Q, M, L, P, 2, generator=g, dtype=torch.float64) * 1.6 - 0.3
    weights = torch.rand(B, Q, M, L * P, generator=g, dtype=torch.float64).softmax(-1).view(B, Q, M, L, P)
    ours = splat_deformable_attention(loc, weights, spatial, starts, reduce)
    ref = _loop_splat(loc, weights, shapes, starts, reduce)
    assert ours.shape == ref.shape
    assert torch.allclose(ours, ref, atol=1e-12)


def test_splat_hand_case_no_half_pixel_shift():
    # one level 2x3 (H=2, W=3), one query/head/point at x=0.5, y=0.25 -> X=1.5, Y=0.5:
    # x0=1, y0=0, every corner gets 0.25 of the weight 0.8 at cells (0,1),(1,1),(0,2),(1,2)
    spatial, starts = _levels([(2, 3)])
    loc = torch.tensor([0.5, 0.25]).view(1, 1, 1, 1, 1, 2)
    a = torch.tensor(0.8).view(1, 1, 1, 1, 1)
    out = splat_deformable_attention(loc, a, spatial, starts, "head")[0, 0]
    expected = torch.zeros(6)
    expected[[1, 2, 4, 5]] = 0.2
    assert torch.allclose(out, expected)
    # a point on the right border x=1 -> X=3: x0=3 is outside, x0+1 too -> all mass dropped
    loc = torch.tensor([1.0, 0.25]).view(1, 1, 1, 1, 1, 2)
    assert splat_deformable_attention(loc, a, spatial, starts, "query").abs().sum() == 0


def test_splat_mass_invariant():
    """Spec 9.7: total mass per (query, head) = 1 minus the mass of out-of-range neighbours."""
    g = torch.Generator().manual_seed(3)
    shapes = [(6, 5), (3, 3)]
    spatial, starts = _levels(shapes)
    B, Q, M, L, P = 2, 4, 3, 2, 2
    weights = torch.rand(B, Q, M, L * P, generator=g, dtype=torch.float64).softmax(-1).view(B, Q, M, L, P)
    # inside: x, y in [0.1, 0.6] keep X < W-1 and Y < H-1 at every level, so all 4 neighbours exist
    inside = torch.rand(B, Q, M, L, P, 2, generator=g, dtype=torch.float64) * 0.5 + 0.1
    per_query = splat_deformable_attention(inside, weights, spatial, starts, "query").sum(-1)
    per_head = splat_deformable_attention(inside, weights, spatial, starts, "head").sum(-1)
    assert torch.allclose(per_query, torch.full((B, Q), float(M), dtype=torch.float64))
    assert torch.allclose(per_head, torch.full((B, M), float(Q), dtype=torch.float64))
    # move the first point of every (q, m, level) far outside (x < -1/W): its whole weight is lost
    outside = inside.clone()
    outside[..., 0, 0] = -0.5
    lost = weights[..., 0].sum((2, 3))  # [B,Q]
    per_query = splat_deformable_attention(outside, weights, spatial, starts, "query").sum(-1)
    assert torch.allclose(per_query, M - lost)
    # a point straddling the top border (y in (-1/H, 0)): only the y0+1 row survives
    edge = inside.clone()
    edge[0, 0, 0, 0, 0, 1] = -0.5 / shapes[0][0]  # Y = -0.5 -> y0 = -1 dropped, weight 0.5 kept
    kept = splat_deformable_attention(edge, weights, spatial, starts, "query").sum(-1)
    assert torch.allclose(kept[0, 0], M - 0.5 * weights[0, 0, 0, 0, 0])


def test_splat_gradients_reach_weights_and_locations():
    spatial, starts = _levels([(4, 4)])
    loc = (torch.rand(1, 2, 2, 1, 3, 2) * 0.8 + 0.05).requires_grad_()
    a = torch.rand(1, 2, 2, 1, 3).requires_grad_()
    out = splat_deformable_attention(loc, a, spatial, starts, "head")
    (out * torch.arange(16.0)).sum().backward()
    assert a.grad.abs().sum() > 0 and loc.grad.abs().sum() > 0


def test_splat_rejects_bad_reduce():
    spatial, starts = _levels([(2, 2)])
    with pytest.raises(ValueError, match="reduce"):
        splat_deformable_attention(torch.zeros(1, 1, 1, 1, 1, 2), torch.zeros(1, 1, 1, 1, 1), spatial, starts, "all")
