"""Multi-scale deformable attention as a Triton kernel (forward + backward), backend ``"triton"``.

JIT-compiled by the Triton that ships with PyTorch's CUDA wheels: no build step. ``"auto"`` picks it
for CUDA tensors when Triton is importable (:mod:`tprd.layers.ms_deform_attn`). The arithmetic is
that of :mod:`tprd.layers.msda_function` (bilinear corners, ``align_corners=False``, zero outside
the map), in float32:

* forward: one program per ``(block of BLOCK_Q queries, batch * head)``; it loops over levels and
  points, loads the four corner rows ``[BLOCK_Q, Dh]`` of the value and accumulates
  ``attention * corner weight * value``;
* backward: the same loop; per corner ``dot = v . grad`` gives the attention and location
  gradients (each written by exactly one program), and ``attention * corner weight * grad`` is
  added atomically into the value gradient (several queries hit one value row).

The backend registered as ``"triton"`` is :func:`checked_msda_triton`: its first call in a process
(per device) compares the kernel with the pure-PyTorch path on a small input, forward and backward,
and on a failure or a mismatch logs one warning and uses the pure-PyTorch path from then on.

On a CPU machine the kernels run under Triton's interpreter (``TRITON_INTERPRET=1`` set before
Triton is imported), which is how the tests check them against the pure-PyTorch Function.
"""
from __future__ import annotations

import logging
from typing import Dict, Optional

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except Exception:  # Triton not installed (or broken): the backend is not registered
    triton = None

__all__ = ["TRITON_AVAILABLE", "msda_triton", "checked_msda_triton", "self_check"]

TRITON_AVAILABLE = triton is not None

if TRITON_AVAILABLE:

    @triton.jit
    def _corner(value_ptr, row_base, xi, yi, h, w, num_heads, head, dh, d, dmask, qmask):
        """Value rows ``[BLOCK_Q, BLOCK_D]`` of the corner ``(xi, yi)`` (zero outside the map) and
        its validity mask and flat row index."""
        valid = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h) & qmask
        row = (row_base + yi * w + xi) * num_heads + head
        v = tl.load(value_ptr + row[:, None] * dh + d[None, :], mask=valid[:, None] & dmask[None, :], other=0.0)
        return v, valid, row

    @triton.jit
    def _program_queries(num_queries, num_heads, dh, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
        """This program's batch index ``b`` and ``head``, the rows ``qm`` ``[BLOCK_Q]`` of its
        ``(b, q, head)`` queries with their mask ``qmask``, and the channels ``d`` ``[BLOCK_D]`` with
        their mask ``dmask`` (forward and backward kernels share the grid)."""
        pid_q = tl.program_id(0)
        pid_bm = tl.program_id(1)
        b = pid_bm // num_heads
        head = pid_bm % num_heads
        q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
        qmask = q < num_queries
        d = tl.arange(0, BLOCK_D)
        dmask = d < dh
        qm = (b * num_queries + q) * num_heads + head  # [BLOCK_Q] row of (b, q, head)
        return b, head, qm, qmask, d, dmask

    @triton.jit
    def _level(shapes_ptr, starts_ptr, lvl, b, num_value):
        """Height, width and first value row (of batch ``b``) of level ``lvl``."""
        h = tl.load(shapes_ptr + 2 * lvl)
        w = tl.load(shapes_ptr + 2 * lvl + 1)
        return h, w, b * num_value + tl.load(starts_ptr + lvl)

    @triton.jit
    def _sample_point(loc_ptr, attn_ptr, qm, lvl, p, num_levels, num_points, qmask, h, w):
        """Index ``i`` ``[BLOCK_Q]`` of sampling point ``p`` of level ``lvl`` of the queries ``qm``,
        its attention weight ``a``, top-left corner ``(x0, y0)`` and bilinear fractions ``(fx, fy)``
        on a level of ``h x w`` (grid_sample's convention: ``align_corners=False``, pixel centres at
        ``+0.5``)."""
        i = qm * (num_levels * num_points) + lvl * num_points + p
        x = tl.load(loc_ptr + 2 * i, mask=qmask, other=0.0)
        y = tl.load(loc_ptr + 2 * i + 1, mask=qmask, other=0.0)
        a = tl.load(attn_ptr + i, mask=qmask, other=0.0)
        px = x * w - 0.5
        py = y * h - 0.5
        x0f = tl.floor(px)
        y0f = tl.floor(py)
        return i, a, x0f.to(tl.int64), y0f.to(tl.int64), px - x0f, py - y0f

    @triton.jit
    def _msda_forward_kernel(value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, out_ptr,
                             num_value, num_queries, num_heads, dh, num_levels, num_points,
                             BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
        b, head, qm, qmask, d, dmask = _program_queries(num_queries, num_heads, dh, BLOCK_Q, BLOCK_D)
        acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=tl.float32)
        for lvl in range(num_levels):
            h, w, row_base = _level(shapes_ptr, starts_ptr, lvl, b, num_value)
            for p in range(num_points):
                i, a, x0, y0, fx, fy = _sample_point(loc_ptr, attn_ptr, qm, lvl, p, num_levels, num_points,
                                                     qmask, h, w)
                v, _, _ = _corner(value_ptr, row_base, x0, y0, h, w, num_heads, head, dh, d, dmask, qmask)
                acc += (a * (1 - fx) * (1 - fy))[:, None] * v
                v, _, _ = _corner(value_ptr, row_base, x0 + 1, y0, h, w, num_heads, head, dh, d, dmask, qmask)
                acc += (a * fx * (1 - fy))[:, None] * v
                v, _, _ = _corner(value_ptr, row_base, x0, y0 + 1, h, w, num_heads, head, dh, d, dmask, qmask)
                acc += (a * (1 - fx) * fy)[:, None] * v
                v, _, _ = _corner(value_ptr, row_base, x0 + 1, y0 + 1, h, w, num_heads, head, dh, d, dmask, qmask)
                acc += (a * fx * fy)[:, None] * v
        tl.store(out_ptr + qm[:, None] * dh + d[None, :], acc, mask=qmask[:, None] & dmask[None, :])

    @triton.jit
    def _corner_backward(value_ptr, grad_value_ptr, row_base, xi, yi, h, w, num_heads, head, dh, d, dmask,
                         qmask, g, scale):
        """``v . g`` of one corner ``[BLOCK_Q]``; adds ``scale * g`` into its value-gradient row."""
        v, valid, row = _corner(value_ptr, row_base, xi, yi, h, w, num_heads, head, dh, d, dmask, qmask)
        tl.atomic_add(grad_value_ptr + row[:, None] * dh + d[None, :], scale[:, None] * g,
                      mask=valid[:, None] & dmask[None, :])
        return tl.sum(v * g, axis=1)

    @triton.jit
    def _msda_backward_kernel(value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, grad_out_ptr,
                              grad_value_ptr, grad_loc_ptr, grad_attn_ptr,
                              num_value, num_queries, num_heads, dh, num_levels, num_points,
                              BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
        b, head, qm, qmask, d, dmask = _program_queries(num_queries, num_heads, dh, BLOCK_Q, BLOCK_D)
        g = tl.load(grad_out_ptr + qm[:, None] * dh + d[None, :], mask=qmask[:, None] & dmask[None, :], other=0.0)
        for lvl in range(num_levels):
            h, w, row_base = _level(shapes_ptr, starts_ptr, lvl, b, num_value)
            for p in range(num_points):
                i, a, x0, y0, fx, fy = _sample_point(loc_ptr, attn_ptr, qm, lvl, p, num_levels, num_points,
                                                     qmask, h, w)
                # corners (0,0), (1,0), (0,1), (1,1): weight, d weight / d px, d weight / d py
                s00 = _corner_backward(value_ptr, grad_value_ptr, row_base, x0, y0, h, w, num_heads, head, dh,
                                       d, dmask, qmask, g, a * (1 - fx) * (1 - fy))
                s10 = _corner_backward(value_ptr, grad_value_ptr, row_base, x0 + 1, y0, h, w, num_heads, head, dh,
                                       d, dmask, qmask, g, a * fx * (1 - fy))
                s01 = _corner_backward(value_ptr, grad_value_ptr, row_base, x0, y0 + 1, h, w, num_heads, head, dh,
                                       d, dmask, qmask, g, a * (1 - fx) * fy)
                s11 = _corner_backward(value_ptr, grad_value_ptr, row_base, x0 + 1, y0 + 1, h, w, num_heads, head,
                                       dh, d, dmask, qmask, g, a * fx * fy)
                ga = s00 * (1 - fx) * (1 - fy) + s10 * fx * (1 - fy) + s01 * (1 - fx) * fy + s11 * fx * fy
                gx = (s10 - s00) * (1 - fy) + (s11 - s01) * fy
                gy = (s01 - s00) * (1 - fx) + (s11 - s10) * fx
                tl.store(grad_attn_ptr + i, ga, mask=qmask)
                tl.store(grad_loc_ptr + 2 * i, a * gx * w, mask=qmask)
                tl.store(grad_loc_ptr + 2 * i + 1, a * gy * h, mask=qmask)


def _launch_shape(value: Tensor, locations: Tensor, block_q: int):
    bsz, num_value, heads, dh = value.shape
    nq, _, nlevels, npoints = locations.shape[1:5]
    grid = (triton.cdiv(nq, block_q), bsz * heads)
    sizes = (num_value, nq, heads, dh, nlevels, npoints)
    return grid, sizes, triton.next_power_of_2(dh)


class _TritonMSDA(torch.autograd.Function):
    """Same contract as :class:`~tprd.layers.msda_function.MSDAFunction` (float32 inside)."""

    BLOCK_Q = 32

    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, locations, attention_weights):
        dtype = value.dtype
        value, locations, attention_weights = (t.float().contiguous() for t in (value, locations, attention_weights))
        shapes = spatial_shapes.to(torch.int64).contiguous()
        starts = level_start_index.to(torch.int64).contiguous()
        ctx.save_for_backward(value, shapes, starts, locations, attention_weights)
        ctx.dtype = dtype
        grid, sizes, block_d = _launch_shape(value, locations, _TritonMSDA.BLOCK_Q)
        bsz, nq, heads, dh = value.shape[0], locations.shape[1], value.shape[2], value.shape[3]
        out = torch.empty(bsz, nq, heads, dh, device=value.device, dtype=torch.float32)
        _msda_forward_kernel[grid](value, shapes, starts, locations, attention_weights, out, *sizes,
                                   BLOCK_Q=_TritonMSDA.BLOCK_Q, BLOCK_D=block_d)
        return out.view(bsz, nq, heads * dh).to(dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        value, shapes, starts, locations, attn = ctx.saved_tensors
        grid, sizes, block_d = _launch_shape(value, locations, _TritonMSDA.BLOCK_Q)
        grad_value = torch.zeros_like(value)
        grad_loc = torch.empty_like(locations)
        grad_attn = torch.empty_like(attn)
        _msda_backward_kernel[grid](value, shapes, starts, locations, attn, grad_out.float().contiguous(),
                                    grad_value, grad_loc, grad_attn, *sizes,
                                    BLOCK_Q=_TritonMSDA.BLOCK_Q, BLOCK_D=block_d)
        dtype = ctx.dtype
        return grad_value.to(dtype), None, None, grad_loc.to(dtype), grad_attn.to(dtype)


def msda_triton(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, sampling_locations: Tensor,
                attention_weights: Tensor) -> Tensor:
    """Backend ``"triton"`` (same signature and result as the other backends)."""
    if not TRITON_AVAILABLE:
        raise RuntimeError("the 'triton' deformable-attention backend needs Triton (pip install triton)")
    return _TritonMSDA.apply(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


# --------------------------------------------------------------------------------------------
# The checked entry point registered as backend "triton"
# --------------------------------------------------------------------------------------------
#: Tolerance of the first-call comparison with the pure-PyTorch Function (float32; the kernel's
#: atomic value-gradient sums may reorder additions, the rest is the same arithmetic).
CHECK_TOLERANCE = 1e-4

# device -> None (not checked yet), True (passed) or the reason it failed; one entry per device
_CHECKED: Dict[str, object] = {}
_logger = logging.getLogger(__name__)


def _check_case(device: torch.device):
    """A small MSDA problem (two levels, points partly outside the maps) drawn from a private
    generator (the global random state is left alone), on ``device``."""
    g = torch.Generator().manual_seed(20260)
    shapes = torch.tensor([[6, 5], [3, 2]])
    sizes = shapes.prod(1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    value = torch.randn(2, int(sizes.sum()), 2, 8, generator=g)
    loc = torch.rand(2, 9, 2, 2, 3, 2, generator=g) * 1.4 - 0.2
    weights = torch.rand(2, 9, 2, 2, 3, generator=g)
    grad = torch.randn(2, 9, 16, generator=g)
    return [t.to(device) for t in (value, shapes, starts, loc, weights, grad)]


def self_check(device: torch.device, kernel=None) -> Optional[str]:
    """Compare ``kernel`` (default :func:`msda_triton`) with the pure-PyTorch Function on a small
    input on ``device``, forward and the three gradients. ``None`` when they agree within
    :data:`CHECK_TOLERANCE`, else the reason (the exception, or what differs and by how much)."""
    from .msda_function import msda_function

    kernel = msda_triton if kernel is None else kernel
    try:
        value, shapes, starts, loc, weights, grad = _check_case(device)
        results = []
        with torch.enable_grad(), torch.autocast(device.type, enabled=False):
            for fn in (msda_function, kernel):
                inputs = [t.clone().requires_grad_(True) for t in (value, loc, weights)]
                out = fn(inputs[0], shapes, starts, inputs[1], inputs[2])
                results.append([out, *torch.autograd.grad(out, inputs, grad)])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as exc:  # compilation, launch or driver error
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:400]
    for name, ref, got in zip(("output", "value gradient", "location gradient", "weight gradient"), *results):
        if got.shape != ref.shape:
            return f"its {name} has shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
        err = (got.float() - ref.float()).abs().max().item()
        if not err <= CHECK_TOLERANCE * (1.0 + ref.abs().max().item()):  # also catches NaN
            return f"its {name} differs from the PyTorch path by {err:.3g} (tolerance {CHECK_TOLERANCE:g})"
    return None


def _reset_checks() -> None:
    """Forget the per-device verdicts (tests)."""
    _CHECKED.clear()


def checked_msda_triton(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Backend ``"triton"`` as registered: :func:`msda_triton` after a one-time check per device.

    The first call on a device compares the kernel with the pure-PyTorch Function on a small input
    (:func:`self_check`, forward and backward). If the kernel fails to compile or run, or disagrees,
    one warning names the cause and this process uses the pure-PyTorch Function on that device from
    then on (a user's first run never crashes or trains on wrong numbers because of the kernel).
    """
    from .msda_function import msda_function

    key = str(value.device)
    if key not in _CHECKED:
        problem = self_check(value.device)
        _CHECKED[key] = True if problem is None else problem
        if problem is not None:
            _logger.warning(
                "deformable attention: the Triton kernel failed its first-use check on %s (%s); using the "
                "pure-PyTorch path (msda_backend='pytorch') for this process instead.", key, problem,
            )
    if _CHECKED[key] is True:
        return msda_triton(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return msda_function(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
