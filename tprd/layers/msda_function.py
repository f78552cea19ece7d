"""Multi-scale deformable attention as one autograd Function with its own backward (pure PyTorch).

The grid_sample path (:func:`~tprd.layers.ms_deform_attn.msda_pytorch`) lets autograd store, per
call, the sampled values of every query, head, level and point (``B*M*Dh*Q*L*P`` floats, twice: the
stack and the weighted product) and runs ``grid_sampler_2d_backward``, which is slow on CPU.
:class:`MSDAFunction` saves only its inputs and recomputes the four bilinear corners in backward.

Convention (identical to ``F.grid_sample(mode="bilinear", padding_mode="zeros",
align_corners=False)``): a normalised location ``(x, y)`` in level ``l`` of size ``(H, W)`` is the
pixel position ``(x*W - 0.5, y*H - 0.5)``; its four neighbours ``(x0, y0) .. (x0+1, y0+1)`` with
``x0 = floor(.)`` get the bilinear weights ``(1-fx)(1-fy), fx(1-fy), (1-fx)fy, fx*fy``; a neighbour
outside the map contributes zero (value and gradient).

For one level, with ``a`` the attention weight of a point, ``c_k`` its corner weights, ``v_k`` the
corner values and ``g`` the output gradient of the query and head:

* ``out       = sum_points a * sum_k c_k v_k``
* ``d a       = sum_k c_k (v_k . g)``
* ``d v_k    += a c_k g``                      (index_add into the value rows)
* ``d x       = a * W * sum_k (d c_k / d px) (v_k . g)``, same for ``y`` with ``H``.

Shapes: ``B`` batch, ``Q`` queries, ``S`` = sum of ``H_l * W_l``, ``M`` heads, ``Dh`` channels per
head, ``L`` levels, ``P`` points.
"""
from __future__ import annotations

import warnings
from typing import List, Tuple

import torch
from torch import Tensor

__all__ = ["MSDAFunction", "msda_function", "bilinear_corners"]

# corner k = (dx, dy): (0, 0), (1, 0), (0, 1), (1, 1)
_DX = (0.0, 1.0, 0.0, 1.0)
_DY = (0.0, 0.0, 1.0, 1.0)


def bilinear_corners(locations: Tensor, height: Tensor, width: Tensor, derivatives: bool = True,
                     index_dtype: torch.dtype = torch.int64):
    """The four bilinear neighbours of normalised ``locations [...,2]`` ``(x, y)`` in maps of
    ``height x width`` (tensors broadcastable to ``locations[..., 0]``; ``align_corners=False``).

    Corner ``k`` is ``(x0 + dx, y0 + dy)`` with ``(dx, dy)`` = (0,0), (1,0), (0,1), (1,1). Returns
    ``index [...,4]`` (``index_dtype`` ``y*W + x``, clamped into the map), ``weight [...,4]`` (zero
    for a neighbour outside the map) and, with ``derivatives``, ``dweight_dx [...,4]`` and
    ``dweight_dy [...,4]`` (derivatives of the weights w.r.t. the normalised ``x`` and ``y``, zero
    outside). The x and y factors are computed on ``[...,2]`` and multiplied out at the end.
    """
    size = torch.stack([width, height], -1).to(locations.dtype).unsqueeze(-1)  # [...,2 (x|y),1]
    pix = locations.unsqueeze(-1) * size - 0.5  # [...,2,1]
    low = pix.floor()
    frac = pix - low
    step = locations.new_tensor([0.0, 1.0])  # left/top neighbour, right/bottom neighbour
    coord = low + step  # [...,2 (x|y),2 (neighbour)]
    inside = ((coord >= 0) & (coord < size)).to(locations.dtype)
    factor = torch.where(step > 0, frac, 1 - frac) * inside  # 1-D bilinear factors, zero outside
    coord = torch.minimum(coord.clamp_min(0), size - 1).to(index_dtype)
    wx, wy = factor[..., 0, None, :], factor[..., 1, :, None]  # [...,1,2], [...,2,1]
    index = (coord[..., 1, :, None] * width.to(index_dtype).unsqueeze(-1).unsqueeze(-1) + coord[..., 0, None, :])
    index = index.flatten(-2)  # [...,4]: k = 2 * dy + dx
    weight = (wy * wx).flatten(-2)
    if not derivatives:
        return index, weight
    slope = (2 * step - 1) * size * inside  # d factor / d normalised coordinate   [...,2,2]
    dwx = (wy * slope[..., 0, None, :]).flatten(-2)
    dwy = (slope[..., 1, :, None] * wx).flatten(-2)
    return index, weight, dwx, dwy


def _corner_rows(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, locations: Tensor,
                 derivatives: bool = True):
    """Corner rows ``[B,Q,M,L,P,4]`` (int32 when they fit) of all levels in the flattened value ``[B*S*M, Dh]`` for
    ``locations [B,Q,M,L,P,2]``, with the weights (and derivatives) of :func:`bilinear_corners`."""
    bsz, _, heads, nlevels = locations.shape[:4]
    num_value = value.shape[1]
    per_level = (1, 1, 1, nlevels, 1)
    height = spatial_shapes[:, 0].view(per_level)
    width = spatial_shapes[:, 1].view(per_level)
    itype = _index_dtype(bsz * num_value * heads, locations[..., 0].numel() * 4)
    index, *weights = bilinear_corners(locations, height, width, derivatives, itype)
    start = level_start_index.view(1, 1, 1, nlevels, 1, 1).to(itype)
    batch = torch.arange(bsz, device=locations.device, dtype=itype).view(bsz, 1, 1, 1, 1, 1) * num_value
    head = torch.arange(heads, device=locations.device, dtype=itype).view(1, 1, heads, 1, 1, 1)
    rows = (index + start + batch) * heads + head
    return (rows, *weights)


def _gather(value_rows: Tensor, rows: Tensor) -> Tensor:
    """``value_rows [R, Dh]`` at ``rows [N, K]`` -> ``[N, K, Dh]``."""
    return value_rows.index_select(0, rows.reshape(-1)).view(*rows.shape, -1)


def _index_dtype(num_rows: int, nnz: int) -> torch.dtype:
    """int32 sparse indices when they fit (faster sort and products), else int64."""
    return torch.int32 if max(num_rows, nnz) < 2**31 - 1 else torch.int64


def _csr(crow: Tensor, cols: Tensor, values: Tensor, size) -> Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(crow, cols, values, size, check_invariants=False)


def _sampling_matrix(rows: Tensor, coef: Tensor, num_rows: int) -> Tensor:
    """CSR matrix ``A [N, num_rows]`` with ``A[n, rows[n, j]] += coef[n, j]`` (``rows``, ``coef``
    ``[N, K]``): one output row per query and head, ``K = L*P*4`` entries each (repeated columns
    are summed by the sparse products, which is what bilinear sampling needs)."""
    n, k = rows.shape
    itype = _index_dtype(num_rows, n * k)
    crow = torch.arange(0, n * k + 1, k, device=rows.device, dtype=itype)
    return _csr(crow, rows.reshape(-1).to(itype), coef.reshape(-1), (n, num_rows))


def _transpose_times(rows: Tensor, coef: Tensor, grad: Tensor, num_rows: int) -> Tensor:
    """``A^T @ grad`` for the ``A`` of :func:`_sampling_matrix` (``grad [N, Dh]`` -> ``[num_rows,
    Dh]``), through the CSR of ``A^T`` (entries sorted by value row, stable: deterministic)."""
    n, k = rows.shape
    itype = _index_dtype(num_rows, n * k)
    flat = rows.reshape(-1).to(itype)
    sorted_rows, order = flat.sort(stable=True)
    crow = torch.searchsorted(sorted_rows, torch.arange(num_rows + 1, device=rows.device, dtype=itype),
                              out_int32=itype == torch.int32)
    cols = torch.div(order, k, rounding_mode="floor").to(itype)  # output row n of each entry
    return _csr(crow, cols, coef.reshape(-1)[order], (num_rows, n)) @ grad


class MSDAFunction(torch.autograd.Function):
    """``(value [B,S,M,Dh], spatial_shapes [L,2], level_start_index [L], sampling_locations
    [B,Q,M,L,P,2], attention_weights [B,Q,M,L,P]) -> [B,Q,M*Dh]``; saves only its inputs.

    On CPU the weighted sampling is one sparse (CSR) matrix ``A`` of ``L*P*4`` entries per query
    and head times the value rows; backward is ``A^T @ grad`` for the value and the sampled dense
    products ``v_k . g`` (``sampled_addmm``) for the locations and weights. On other devices the
    same sums are taken with ``index_select`` / ``index_add_`` per level.
    """

    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        bsz, _, heads, dh = value.shape
        nq = sampling_locations.shape[1]
        value_rows = value.reshape(-1, dh)
        rows, weight = _corner_rows(value, spatial_shapes, level_start_index, sampling_locations, False)
        n = bsz * nq * heads
        rows = rows.view(n, -1)
        coef = (attention_weights.unsqueeze(-1) * weight).view(n, -1)  # [N, L*P*4]
        if value.device.type == "cpu":
            out = _sampling_matrix(rows, coef, value_rows.shape[0]) @ value_rows
        else:
            out = coef.unsqueeze(1) @ _gather(value_rows, rows)
        return out.view(bsz, nq, heads * dh)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        value, spatial_shapes, level_start_index, locations, attn = ctx.saved_tensors
        bsz, _, heads, dh = value.shape
        nq = locations.shape[1]
        n = bsz * nq * heads
        need_value, _, _, need_loc, need_attn = ctx.needs_input_grad
        value_rows = value.reshape(-1, dh)
        grad = grad_out.reshape(n, dh).to(value.dtype)
        rows, weight, dwx, dwy = _corner_rows(value, spatial_shapes, level_start_index, locations)
        a = attn.unsqueeze(-1)  # [B,Q,M,L,P,1]
        flat_rows = rows.view(n, -1)  # [N, L*P*4]
        g_value = g_loc = g_attn = None
        if need_value:
            coef = (a * weight).view(n, -1)
            if value.device.type == "cpu":
                g_value = _transpose_times(flat_rows, coef, grad, value_rows.shape[0])
            else:
                g_value = torch.zeros_like(value_rows).index_add_(
                    0, flat_rows.reshape(-1), (coef.unsqueeze(-1) * grad.unsqueeze(1)).reshape(-1, dh))
            g_value = g_value.view_as(value)
        if need_loc or need_attn:
            if value.device.type == "cpu":
                ones = _sampling_matrix(flat_rows, torch.ones_like(weight), value_rows.shape[0])
                dots = torch.sparse.sampled_addmm(ones, grad, value_rows.t(), beta=0.0).values()
            else:
                dots = _gather(value_rows, flat_rows) @ grad.unsqueeze(-1)
            dots = dots.view_as(weight)  # v_k . g   [B,Q,M,L,P,4]
            g_attn = (dots * weight).sum(-1)
            g_loc = torch.stack([(dots * dwx).sum(-1), (dots * dwy).sum(-1)], -1) * a
        return g_value, None, None, g_loc, g_attn


def msda_function(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, sampling_locations: Tensor,
                  attention_weights: Tensor) -> Tensor:
    """Backend ``"pytorch"``: :class:`MSDAFunction` (same signature and result as the grid_sample
    path). Locations and weights are computed in the value's dtype."""
    dtype = value.dtype
    return MSDAFunction.apply(
        value, spatial_shapes, level_start_index, sampling_locations.to(dtype), attention_weights.to(dtype)
    )
