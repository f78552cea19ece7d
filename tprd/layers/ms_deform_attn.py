"""Multi-scale deformable attention (Deformable DETR, Zhu et al. 2021).

Each query looks at ``num_points`` sampled locations per head and per feature level, around its
reference point; the sampled values (bilinear interpolation, zero outside the map) are averaged
with softmax weights over ``num_levels * num_points``.

The sampling kernel is a pluggable function. :func:`multi_scale_deformable_attention` dispatches
to the backend chosen with :func:`set_msda_backend` (default ``"auto"``), or to the module's own
``msda_backend`` when set:

* ``"pytorch"`` -- :func:`~tprd.layers.msda_function.msda_function`, one autograd Function with its
  own backward that saves only its inputs (the CPU path when the C++ kernel cannot be built);
* ``"grid_sample"`` -- :func:`msda_pytorch`, the ``F.grid_sample`` path (bilinear, zero padding,
  ``align_corners=False``) that detrex itself uses on CPU and against which the parity fixtures
  were produced; ``"auto"`` and ``"pytorch"`` use it while tracing or exporting (ONNX ``GridSample``);
* ``"cpp"`` -- a C++ CPU kernel (:mod:`tprd.layers.msda_cpp`), chosen by ``"auto"`` for CPU
  tensors: compiled on first use (a C++ compiler and ninja; about a minute once, one log line
  while it builds, then cached); when it cannot be built, ``"auto"`` logs one warning with the
  reason and uses ``"pytorch"`` for the rest of the process (:func:`cpu_backend`);
* ``"triton"`` -- the Triton kernel (:mod:`tprd.layers.msda_triton`), chosen by ``"auto"`` for CUDA
  tensors when Triton is importable; checked against the pure-PyTorch path on its first call in a
  process (falls back to it with one warning when the kernel fails or disagrees); ``"cuda_ext"`` -- the compiled Deformable-DETR op when installed.

A new kernel is added with :func:`register_msda_backend`.

Shapes used throughout: ``B`` batch, ``Q`` queries, ``S`` = sum of ``H_l * W_l`` value tokens,
``M`` heads, ``Dh`` channels per head, ``L`` levels, ``P`` points.
"""
from __future__ import annotations

import logging
import math
import os
import warnings
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .msda_cpp import msda_cpp
from .msda_function import msda_function

__all__ = [
    "MultiScaleDeformableAttention",
    "multi_scale_deformable_attention",
    "msda_pytorch",
    "msda_function",
    "check_msda_backend",
    "resolve_msda_backend",
    "register_msda_backend",
    "set_msda_backend",
    "get_msda_backend",
    "available_msda_backends",
    "cpu_backend",
    "saved_as_sum",
    "set_sum_recipe",
]

# A backend: (value [B,S,M,Dh], spatial_shapes [L,2] (h, w) int64, level_start_index [L],
#             sampling_locations [B,Q,M,L,P,2] in [0,1] (x, y), attention_weights [B,Q,M,L,P])
#             -> output [B,Q,M*Dh]
MSDAFunction = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]


def msda_pytorch(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, sampling_locations: Tensor,
                 attention_weights: Tensor) -> Tensor:
    """Reference kernel: bilinear ``grid_sample`` per level, weighted sum over levels and points.

    ``value [B,S,M,Dh]``; ``sampling_locations [B,Q,M,L,P,2]`` normalised ``(x, y)`` with ``(0, 0)``
    the top-left corner of the map and ``(1, 1)`` its bottom-right corner (pixel ``i`` covers
    ``[i/W, (i+1)/W]``); ``attention_weights [B,Q,M,L,P]``. Returns ``[B,Q,M*Dh]``.
    """
    bsz, _, heads, dh = value.shape
    _, nq, _, nlevels, npoints, _ = sampling_locations.shape
    sizes = [int(h) * int(w) for h, w in spatial_shapes.tolist()]
    per_level = value.split(sizes, dim=1)
    grids = 2 * sampling_locations - 1  # grid_sample's [-1, 1] convention
    sampled = []
    for lvl, (h, w) in enumerate(spatial_shapes.tolist()):
        # [B, h*w, M, Dh] -> [B*M, Dh, h, w]
        v = per_level[lvl].flatten(2).transpose(1, 2).reshape(bsz * heads, dh, int(h), int(w))
        # [B, Q, M, P, 2] -> [B*M, Q, P, 2]
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        # -> [B*M, Dh, Q, P]
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    # [B, Q, M, L, P] -> [B*M, 1, Q, L*P]
    weights = attention_weights.transpose(1, 2).reshape(bsz * heads, 1, nq, nlevels * npoints)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)  # [B*M, Dh, Q]
    return out.view(bsz, heads * dh, nq).transpose(1, 2).contiguous()


# --------------------------------------------------------------------------------------------
# Backend registry
# --------------------------------------------------------------------------------------------

_logger = logging.getLogger(__name__)

_BACKENDS: Dict[str, MSDAFunction] = {"pytorch": msda_function, "grid_sample": msda_pytorch, "cpp": msda_cpp}
_CUDA_ONLY = set()
# "auto" on CUDA: the first of these that is registered (then any other CUDA-only backend)
_CUDA_PREFERENCE = ("triton", "cuda_ext")
#: The process-wide default can be set from the environment (every model of the process, e.g. a
#: teacher and its student, or every run of tools/distill_benchmark.py --msda-backend).
ENV_BACKEND = "TPRD_MSDA_BACKEND"
_ACTIVE = "auto"


def register_msda_backend(name: str, fn: MSDAFunction, cuda_only: bool = True) -> None:
    """Make ``fn`` selectable as backend ``name`` (same signature as :func:`msda_pytorch`).

    With ``cuda_only`` the ``"auto"`` mode uses it only for CUDA tensors.
    """
    _BACKENDS[name] = fn
    if cuda_only:
        _CUDA_ONLY.add(name)
    else:
        _CUDA_ONLY.discard(name)


def check_msda_backend(name: str) -> str:
    """``name`` when it is ``"auto"`` or a registered backend; else a ValueError naming the choices."""
    if name != "auto" and name not in _BACKENDS:
        raise ValueError(
            f"unknown deformable-attention backend {name!r} (msda_backend); "
            f"available: {['auto'] + sorted(_BACKENDS)}"
        )
    return name


def set_msda_backend(name: str) -> None:
    """The process-wide backend: ``"auto"`` (a GPU kernel on CUDA when available; on CPU the C++
    kernel when it builds, else ``"pytorch"``; ``"grid_sample"`` while tracing/exporting), or any
    registered name. Its initial
    value is ``$TPRD_MSDA_BACKEND`` (``"auto"`` when unset)."""
    global _ACTIVE
    _ACTIVE = check_msda_backend(name)


def get_msda_backend() -> str:
    return _ACTIVE


def available_msda_backends() -> Tuple[str, ...]:
    return tuple(sorted(_BACKENDS))


_CPU_CHOICE: Optional[str] = None


def cpu_backend() -> str:
    """What ``"auto"`` runs on CPU tensors: ``"cpp"`` when the C++ kernel builds (or is cached), else
    ``"pytorch"``. Decided once per process: the first call loads (compiling on first use on this
    machine) the kernel; a failed build logs one warning naming the cause and the fallback."""
    global _CPU_CHOICE
    if _CPU_CHOICE is None:
        from .msda_cpp import CppExtensionError, load_extension

        try:
            load_extension()
            _CPU_CHOICE = "cpp"
        except CppExtensionError as exc:
            reason = str(exc).strip().splitlines()
            _logger.warning(
                "deformable attention on CPU: the C++ kernel could not be built (%s); using the pure-PyTorch "
                "path (msda_backend='pytorch', about 2x slower per training step) for this process. Install a "
                "C++ compiler and ninja for the fast path, or set %s=pytorch to skip the attempt.",
                _build_failure_cause(reason), ENV_BACKEND,
            )
            _CPU_CHOICE = "pytorch"
    return _CPU_CHOICE


def _build_failure_cause(lines) -> str:
    """The most telling line of a build error: the first one naming an error, else the first."""
    for line in lines:
        if "failed:" in line:
            return line.split("failed:", 1)[1].strip()[:300] or line[:300]
    return (lines[0] if lines else "unknown error")[:300]


def _reset_cpu_backend() -> None:
    """Forget the CPU decision (tests)."""
    global _CPU_CHOICE
    _CPU_CHOICE = None


def _is_exporting() -> bool:
    """Tracing (``torch.jit.trace``), exporting (ONNX, ``torch.export``) or compiling: the graph
    gets the ``grid_sample`` ops, which every exporter knows."""
    return (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling())


def resolve_msda_backend(name: str, value: Tensor) -> str:
    """The backend ``name`` stands for with ``value`` (``"auto"`` resolved). While tracing or
    exporting, ``"auto"``, ``"pytorch"`` and ``"cpp"`` (sparse products and a compiled op, which no
    exporter knows) resolve to ``"grid_sample"``, the same arithmetic in standard ops."""
    if name in ("auto", "pytorch", "cpp") and _is_exporting():
        return "grid_sample"
    if name != "auto":
        return name
    if value.is_cuda:
        preferred = [n for n in _CUDA_PREFERENCE if n in _CUDA_ONLY]
        others = sorted(_CUDA_ONLY - set(preferred))
        if preferred or others:
            return (preferred + others)[0]
        return "pytorch"
    if value.device.type == "cpu":
        return cpu_backend()
    return "pytorch"


def multi_scale_deformable_attention(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    backend: Optional[str] = None,
) -> Tensor:
    """Dispatch to ``backend`` (``None``: the process-wide one, see :func:`set_msda_backend`).
    Returns ``[B,Q,M*Dh]``."""
    name = resolve_msda_backend(_ACTIVE if backend is None else backend, value)
    return _BACKENDS[name](value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


def _try_register_compiled_op() -> None:
    """Register the original Deformable-DETR CUDA op (module ``MultiScaleDeformableAttention``,
    built from ``models/ops`` of fundamentalvision/Deformable-DETR) when it is installed."""
    try:
        import MultiScaleDeformableAttention as _ext  # type: ignore
    except Exception:  # not installed: the PyTorch path is used
        return

    class _CompiledMSDA(torch.autograd.Function):
        @staticmethod
        def forward(ctx, value, shapes, starts, locations, weights, step):
            ctx.step = step
            ctx.save_for_backward(value, shapes, starts, locations, weights)
            return _ext.ms_deform_attn_forward(value, shapes, starts, locations, weights, step)

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, grad_out):
            value, shapes, starts, locations, weights = ctx.saved_tensors
            g_value, g_loc, g_w = _ext.ms_deform_attn_backward(
                value, shapes, starts, locations, weights, grad_out.contiguous(), ctx.step
            )
            return g_value, None, None, g_loc, g_w, None

    def compiled(value, shapes, starts, locations, weights):
        dtype = value.dtype
        out = _CompiledMSDA.apply(
            value.float(), shapes, starts, locations.float(), weights.float(), 64
        )
        return out.to(dtype)

    register_msda_backend("cuda_ext", compiled, cuda_only=True)


_try_register_compiled_op()


def _try_register_triton() -> None:
    """Register the Triton kernel (:mod:`tprd.layers.msda_triton`) when Triton is importable."""
    from .msda_triton import TRITON_AVAILABLE, checked_msda_triton

    if TRITON_AVAILABLE:
        # checked on its first call per device against the pure-PyTorch path (one warning and
        # that path for the process on a failure or mismatch)
        register_msda_backend("triton", checked_msda_triton, cuda_only=True)


_try_register_triton()


def _backend_from_environment() -> str:
    name = os.environ.get(ENV_BACKEND, "").strip() or "auto"
    try:
        return check_msda_backend(name)
    except ValueError as exc:
        raise ValueError(f"environment variable {ENV_BACKEND}={name!r}: {exc}") from None


_ACTIVE = _backend_from_environment()


# --------------------------------------------------------------------------------------------
# Keeping a sum's terms instead of the sum for backward
# --------------------------------------------------------------------------------------------

_SUM_RECIPE = True


def set_sum_recipe(enabled: bool) -> None:
    """Keep ``query = content + query_pos`` as its two terms for backward (default) or as itself
    (the plain autograd path; tests and benchmarks compare)."""
    global _SUM_RECIPE
    _SUM_RECIPE = bool(enabled)


def _keep_sum_recipe(query: Tensor) -> bool:
    from .saved_tensors import may_repack

    return (_SUM_RECIPE and torch.is_grad_enabled() and query.requires_grad
            and not torch.jit.is_tracing() and not torch.compiler.is_compiling() and may_repack())


class _SumRecipe:
    """What a saved view of ``a + b`` is packed into: the terms, the view's geometry, and (during
    backward, shared by every node that saved the sum) the sum recomputed once."""

    __slots__ = ("a", "b", "versions", "total")

    def __init__(self, a: Tensor, b: Tensor):
        self.a, self.b, self.total = a, b, None
        self.versions = (a._version, b._version)

    def unpack(self, size, stride, offset) -> Tensor:
        if self.total is None:
            if (self.a._version, self.b._version) != self.versions:
                raise RuntimeError("a term of a sum saved for backward (deformable attention's query + query_pos) "
                                   "was modified in place after the forward")
            self.total = self.a + self.b  # the forward's op on the same tensors: the same bits
        return self.total.as_strided(size, stride, offset)


class saved_as_sum(torch.autograd.graph.saved_tensors_hooks):
    """Inside this context, a tensor saved for backward that shares ``total``'s storage (``total =
    a + b``, contiguous, e.g. the 2-d view a linear layer saves) is kept as ``(a, b)`` and added
    again when backward needs it. Exact (an element-wise add gives the same floats again); it saves
    the storage of ``total`` when ``a`` and ``b`` are kept alive anyway (here: the layer's input,
    which its value projection saves, and the position embedding, shared by every layer). Other
    saved tensors are kept as they are. The recompute is one element-wise add per layer in backward
    (next to the layer's matrix products, about 1/256 of their operations)."""

    def __init__(self, total: Tensor, a: Tensor, b: Tensor):
        from .saved_tensors import outer_observer

        ptr, dtype, contiguous = total.untyped_storage().data_ptr(), total.dtype, total.is_contiguous()
        recipe = _SumRecipe(a, b)
        observe = outer_observer() or (lambda t: t)

        def pack(t: Tensor):
            if contiguous and t.untyped_storage().data_ptr() == ptr and t.dtype == dtype:
                observe(a)
                observe(b)
                return (recipe, t.size(), t.stride(), t.storage_offset())
            observe(t)
            return t

        def unpack(packed):
            if isinstance(packed, tuple):
                return packed[0].unpack(*packed[1:])
            return packed

        super().__init__(pack, unpack)


# --------------------------------------------------------------------------------------------
# Module
# --------------------------------------------------------------------------------------------


class MultiScaleDeformableAttention(nn.Module):
    """Deformable attention over ``num_levels`` flattened feature maps.

    Parameters (detrex names): ``sampling_offsets`` Linear(D -> M*L*P*2), ``attention_weights``
    Linear(D -> M*L*P), ``value_proj`` and ``output_proj`` Linear(D -> D). The module returns
    ``output_proj(attention)`` only: residual connection and dropout belong to the layer that uses it.
    ``msda_backend``: this module's sampling backend (``None``: the process-wide one).
    """

    def __init__(self, embed_dim: int = 256, num_heads: int = 8, num_levels: int = 4, num_points: int = 4,
                 msda_backend: Optional[str] = None):
        super().__init__()
        self.msda_backend = None if msda_backend is None else check_msda_backend(msda_backend)
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        head_dim = embed_dim // num_heads
        if head_dim & (head_dim - 1):
            warnings.warn(f"deformable attention head dim {head_dim} is not a power of 2 (slower CUDA kernel)")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """detrex/Deformable-DETR init: zero offset weights; offset biases point each head in its own
        direction (angle 2*pi*m/M, scaled so the larger component is 1) at distance 1..P for point
        1..P; uniform attention; Xavier-uniform value/output projections with zero bias."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        direction = torch.stack([angles.cos(), angles.sin()], -1)
        direction = direction / direction.abs().max(-1, keepdim=True)[0]
        scale = torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        bias = direction.view(self.num_heads, 1, 1, 2) * scale
        bias = bias.expand(self.num_heads, self.num_levels, self.num_points, 2)
        self.sampling_offsets.bias.copy_(bias.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def sampling(self, query: Tensor, reference_points: Tensor, spatial_shapes: Tensor) -> Tuple[Tensor, Tensor]:
        """Sampling locations ``[B,Q,M,L,P,2]`` and softmax weights ``[B,Q,M,L,P]`` of ``query [B,Q,D]``.

        ``reference_points``: ``[B,Q,L,2]`` normalised points (offsets are in pixels of each level),
        or ``[B,Q,L,4]`` boxes ``(cx, cy, w, h)`` (offsets are ``offset / P * wh * 0.5``).
        """
        bsz, nq, _ = query.shape
        m, nl, npnt = self.num_heads, self.num_levels, self.num_points
        offsets = self.sampling_offsets(query).view(bsz, nq, m, nl, npnt, 2)
        weights = self.attention_weights(query).view(bsz, nq, m, nl * npnt).softmax(-1)
        weights = weights.view(bsz, nq, m, nl, npnt)
        if reference_points.shape[-1] == 2:
            normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1)
            locations = (
                reference_points[:, :, None, :, None, :]
                + offsets / normalizer[None, None, None, :, None, :]
            )
        elif reference_points.shape[-1] == 4:
            locations = (
                reference_points[:, :, None, :, None, :2]
                + offsets / npnt * reference_points[:, :, None, :, None, 2:] * 0.5
            )
        else:
            raise ValueError(f"reference_points must end in 2 or 4 coordinates, got {tuple(reference_points.shape)}")
        return locations, weights

    def forward(
        self,
        query: Tensor,
        value: Tensor,
        reference_points: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        query_pos: Optional[Tensor] = None,
        value_padding_mask: Optional[Tensor] = None,
        return_sampling: bool = False,
    ):
        """Attend from ``query [B,Q,D]`` (plus ``query_pos``) into ``value [B,S,D]``.

        ``value_padding_mask [B,S]`` (``True`` = padding) zeroes those value tokens after the value
        projection. Returns ``[B,Q,D]``, or ``(output, {"sampling_locations", "attention_weights"})``
        with ``return_sampling``.
        """
        content = query
        if query_pos is not None:
            query = query + query_pos
        bsz, nq, _ = query.shape
        _, nv, _ = value.shape
        value = self.value_proj(value)
        if value_padding_mask is not None:
            value = value.masked_fill(value_padding_mask[..., None], 0.0)
        value = value.view(bsz, nv, self.num_heads, -1)
        if query_pos is not None and _keep_sum_recipe(query):
            # the offset and weight projections keep ``content`` and ``query_pos`` (alive anyway)
            # instead of their sum, which backward adds again: one tensor [B,Q,D] less per layer
            with saved_as_sum(query, content, query_pos):
                locations, weights = self.sampling(query, reference_points, spatial_shapes)
        else:
            locations, weights = self.sampling(query, reference_points, spatial_shapes)
        out = multi_scale_deformable_attention(value, spatial_shapes, level_start_index, locations, weights,
                                               backend=self.msda_backend)
        out = self.output_proj(out)
        if return_sampling:
            return out, {"sampling_locations": locations, "attention_weights": weights}
        return out
