"""Deformable-attention "flat grid" splatting (docs/methods.md#b6).

A deformable cross-attention call samples, for every query ``q`` and head ``m``, ``L x P`` points
with weights ``a`` (softmax over levels x points per head). Splatting turns those samples into a
map over the ``S = sum_l H_l W_l`` flattened memory tokens: each weight is spread bilinearly onto
the 4 integer neighbours of its sampling point, in the continuous grid coordinates

    X = x * W_l,  Y = y * H_l                      (no half-pixel shift)
    x0 = floor(X), y0 = floor(Y)
    (x0,   y0  ) gets a * (x0 + 1 - X) * (y0 + 1 - Y)
    (x0,   y0+1) gets a * (x0 + 1 - X) * (Y - y0)
    (x0+1, y0  ) gets a * (X - x0)     * (y0 + 1 - Y)
    (x0+1, y0+1) gets a * (X - x0)     * (Y - y0)

Neighbours outside ``[0, W_l) x [0, H_l)`` are dropped; the token of cell ``(row, col)`` of level
``l`` is ``row * W_l + col + level_start_l``. D³ETR sums per (image, head) over queries, levels
and points (``reduce="head"``, ``[B,M,S]``); QSKD per (image, query) over heads, levels and points
(``reduce="query"``, ``[B,Q,S]``).

Everything is one ``scatter_add`` over all ``B*Q*M*L*P*4`` contributions (docs/methods.md#diff-10); the map is
differentiable with respect to the attention weights and, through the bilinear factors, the
sampling locations.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["splat_deformable_attention", "SPLAT_REDUCTIONS"]

SPLAT_REDUCTIONS = ("head", "query")

# corner order (dx, dy): (0,0), (0,1), (1,0), (1,1)
_DX = (0, 0, 1, 1)
_DY = (0, 1, 0, 1)


def splat_deformable_attention(
    sampling_locations: Tensor,
    attention_weights: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    reduce: str = "head",
) -> Tensor:
    """Splat deformable attention onto the flattened multi-scale tokens (B6).

    Args:
        sampling_locations: ``[B,Q,M,L,P,2]`` normalised ``(x, y)``, exactly the locations the
            attention samples (reference x valid ratio + offsets).
        attention_weights: ``[B,Q,M,L,P]``.
        spatial_shapes: ``[L,2]`` long, ``(H_l, W_l)``.
        level_start_index: ``[L]`` long, first token of each level.
        reduce: ``"head"`` -> ``[B,M,S]`` (summed over queries, levels, points);
            ``"query"`` -> ``[B,Q,S]`` (summed over heads, levels, points).

    Returns:
        The splatted map in the dtype of ``attention_weights``.
    """
    if reduce not in SPLAT_REDUCTIONS:
        raise ValueError(f"splat_deformable_attention: reduce must be one of {SPLAT_REDUCTIONS}, got {reduce!r}")
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(f"sampling_locations must be [B,Q,M,L,P,2], got {tuple(sampling_locations.shape)}")
    if attention_weights.shape != sampling_locations.shape[:-1]:
        raise ValueError(
            f"attention_weights {tuple(attention_weights.shape)} must be sampling_locations' shape without the "
            f"last dim {tuple(sampling_locations.shape[:-1])}"
        )
    bsz, nq, nh, nl, _, _ = sampling_locations.shape
    if spatial_shapes.shape != (nl, 2):
        raise ValueError(f"spatial_shapes must be [L={nl},2], got {tuple(spatial_shapes.shape)}")
    device = attention_weights.device
    shapes = spatial_shapes.to(device=device, dtype=torch.long)
    starts = level_start_index.to(device=device, dtype=torch.long).view(1, 1, 1, nl, 1, 1)
    num_tokens = int(shapes.prod(1).sum())
    h = shapes[:, 0].view(1, 1, 1, nl, 1, 1)
    w = shapes[:, 1].view(1, 1, 1, nl, 1, 1)

    loc = sampling_locations.to(attention_weights.dtype)
    gx = loc[..., 0:1] * w  # [B,Q,M,L,P,1] continuous grid coordinates
    gy = loc[..., 1:2] * h
    x0, y0 = torch.floor(gx), torch.floor(gy)
    fx, fy = gx - x0, gy - y0  # the "X - x0", "Y - y0" factors
    dx = torch.tensor(_DX, device=device)
    dy = torch.tensor(_DY, device=device)
    wx = torch.where(dx.bool(), fx, 1 - fx)  # [B,Q,M,L,P,4]
    wy = torch.where(dy.bool(), fy, 1 - fy)
    col = x0.long() + dx
    row = y0.long() + dy
    inside = (col >= 0) & (col < w) & (row >= 0) & (row < h)
    token = (row * w + col + starts).masked_fill(~inside, 0)
    value = (attention_weights[..., None] * wx * wy).masked_fill(~inside, 0)

    if reduce == "head":  # destination row (b, m)
        dest = (torch.arange(bsz, device=device).view(bsz, 1, 1, 1, 1, 1) * nh
                + torch.arange(nh, device=device).view(1, 1, nh, 1, 1, 1))
        rows = bsz * nh
    else:  # destination row (b, q)
        dest = (torch.arange(bsz, device=device).view(bsz, 1, 1, 1, 1, 1) * nq
                + torch.arange(nq, device=device).view(1, nq, 1, 1, 1, 1))
        rows = bsz * nq
    index = (dest * num_tokens + token).reshape(-1)
    out = value.new_zeros(rows * num_tokens).scatter_add(0, index, value.reshape(-1))
    return out.view(bsz, -1, num_tokens)
