"""Multi-scale deformable attention as a C++ CPU kernel (forward + backward), backend ``"cpp"``.

The default on CPU: ``"auto"`` picks it for CPU tensors when it builds and falls back to the
pure-PyTorch :class:`~tprd.layers.msda_function.MSDAFunction` (one warning) when it cannot (see
:func:`~tprd.layers.ms_deform_attn.cpu_backend`); ``msda_backend=cpp`` asks for it explicitly (an
error when it cannot be built). The kernel is compiled on first use with :func:`torch.utils.cpp_extension.load_inline` (a C++ compiler and
``ninja`` are needed; about a minute once, then cached under ``$TORCH_EXTENSIONS_DIR``, default
``~/.cache/torch_extensions``). It uses torch's intra-op threads (``torch.set_num_threads``).

The arithmetic is that of :mod:`tprd.layers.msda_function` (bilinear corners, ``align_corners=False``,
zero outside the map), looped instead of materialised:

* forward: in parallel over ``(batch, query)``; per head, level and point, the (up to) four corner
  rows of the value are accumulated with ``attention * corner weight`` into the output row;
* backward: in parallel over ``(batch, head)``, whose value-gradient rows no other task touches (no
  atomics, deterministic); per corner ``dot = v . grad`` gives the attention and location gradients
  and ``attention * corner weight * grad`` is added into the value gradient.

float32 and float64 run natively; other dtypes (bfloat16 autocast) are computed in float32.

On x86-64 CPUs with AVX2 (``torch.backends.cpu.get_cpu_capability()``) the kernel is built with
AVX2 and FMA instructions (``tprd_msda_cpu_avx2``; about 0.72x of the baseline build's forward
time and 0.83x of its forward+backward at an encoder layer, ``benchmarks/msda_steps.md``) and with
``-ffp-contract=off``, so its results are bit-identical to the baseline build's; elsewhere, or if
that build fails, the baseline build (``tprd_msda_cpu``).
"""
from __future__ import annotations

import logging
import threading

import torch
from torch import Tensor

__all__ = ["msda_cpp", "load_extension", "CppExtensionError"]

logger = logging.getLogger(__name__)

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <vector>

namespace {

// Bilinear neighbours of a normalised location (x, y) in an h x w map (grid_sample,
// align_corners=False). Returns false when no neighbour can be inside (also NaN / inf).
template <typename T>
inline bool corners(T lx, T ly, int64_t h, int64_t w, int64_t& x0, int64_t& y0, T& fx, T& fy) {
  const T x = lx * static_cast<T>(w) - T(0.5);
  const T y = ly * static_cast<T>(h) - T(0.5);
  if (!(x >= T(-1) && x < static_cast<T>(w) && y >= T(-1) && y < static_cast<T>(h))) return false;
  const T xf = std::floor(x), yf = std::floor(y);
  x0 = static_cast<int64_t>(xf);
  y0 = static_cast<int64_t>(yf);
  fx = x - xf;
  fy = y - yf;
  return true;
}

template <typename T>
void forward_impl(const T* value, const int64_t* shapes, const int64_t* starts, const T* loc,
                  const T* attn, T* out, int64_t B, int64_t S, int64_t M, int64_t D, int64_t Q,
                  int64_t L, int64_t P) {
  at::parallel_for(0, B * Q, 8, [&](int64_t begin, int64_t end) {
    for (int64_t bq = begin; bq < end; ++bq) {
      const int64_t b = bq / Q;
      for (int64_t m = 0; m < M; ++m) {
        T* o = out + (bq * M + m) * D;
        for (int64_t d = 0; d < D; ++d) o[d] = T(0);
        for (int64_t l = 0; l < L; ++l) {
          const int64_t h = shapes[2 * l], w = shapes[2 * l + 1];
          const T* level = value + ((b * S + starts[l]) * M + m) * D;
          for (int64_t p = 0; p < P; ++p) {
            const int64_t i = ((bq * M + m) * L + l) * P + p;
            int64_t x0, y0;
            T fx, fy;
            if (!corners(loc[2 * i], loc[2 * i + 1], h, w, x0, y0, fx, fy)) continue;
            const T a = attn[i];
            const T wx[2] = {T(1) - fx, fx};
            const T wy[2] = {T(1) - fy, fy};
            for (int cy = 0; cy < 2; ++cy) {
              const int64_t yy = y0 + cy;
              if (yy < 0 || yy >= h) continue;
              for (int cx = 0; cx < 2; ++cx) {
                const int64_t xx = x0 + cx;
                if (xx < 0 || xx >= w) continue;
                const T c = a * wy[cy] * wx[cx];
                const T* v = level + (yy * w + xx) * M * D;
                for (int64_t d = 0; d < D; ++d) o[d] += c * v[d];
              }
            }
          }
        }
      }
    }
  });
}

template <typename T>
void backward_impl(const T* value, const int64_t* shapes, const int64_t* starts, const T* loc,
                   const T* attn, const T* grad, T* g_value, T* g_loc, T* g_attn, int64_t B,
                   int64_t S, int64_t M, int64_t D, int64_t Q, int64_t L, int64_t P) {
  at::parallel_for(0, B * M, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bm = begin; bm < end; ++bm) {
      const int64_t b = bm / M, m = bm % M;
      for (int64_t q = 0; q < Q; ++q) {
        const int64_t bq = b * Q + q;
        const T* g = grad + (bq * M + m) * D;
        for (int64_t l = 0; l < L; ++l) {
          const int64_t h = shapes[2 * l], w = shapes[2 * l + 1];
          const int64_t offset = ((b * S + starts[l]) * M + m) * D;
          for (int64_t p = 0; p < P; ++p) {
            const int64_t i = ((bq * M + m) * L + l) * P + p;
            int64_t x0, y0;
            T fx, fy;
            if (!corners(loc[2 * i], loc[2 * i + 1], h, w, x0, y0, fx, fy)) {
              g_attn[i] = T(0);
              g_loc[2 * i] = T(0);
              g_loc[2 * i + 1] = T(0);
              continue;
            }
            const T a = attn[i];
            const T wx[2] = {T(1) - fx, fx};
            const T wy[2] = {T(1) - fy, fy};
            const T sx[2] = {-static_cast<T>(w), static_cast<T>(w)};  // d wx / d normalised x
            const T sy[2] = {-static_cast<T>(h), static_cast<T>(h)};
            T ga = T(0), gx = T(0), gy = T(0);
            for (int cy = 0; cy < 2; ++cy) {
              const int64_t yy = y0 + cy;
              if (yy < 0 || yy >= h) continue;
              for (int cx = 0; cx < 2; ++cx) {
                const int64_t xx = x0 + cx;
                if (xx < 0 || xx >= w) continue;
                const int64_t row = offset + (yy * w + xx) * M * D;
                const T* v = value + row;
                T* gv = g_value + row;
                const T c = a * wy[cy] * wx[cx];
                T dot = T(0);
                for (int64_t d = 0; d < D; ++d) {
                  dot += v[d] * g[d];
                  gv[d] += c * g[d];
                }
                ga += wy[cy] * wx[cx] * dot;
                gx += wy[cy] * sx[cx] * dot;
                gy += sy[cy] * wx[cx] * dot;
              }
            }
            g_attn[i] = ga;
            g_loc[2 * i] = a * gx;
            g_loc[2 * i + 1] = a * gy;
          }
        }
      }
    }
  });
}

void check(const torch::Tensor& value, const torch::Tensor& shapes, const torch::Tensor& starts,
           const torch::Tensor& loc, const torch::Tensor& attn) {
  TORCH_CHECK(value.device().is_cpu(), "msda cpp backend: CPU tensors only");
  TORCH_CHECK(value.dim() == 4 && loc.dim() == 6 && attn.dim() == 5, "msda cpp backend: bad ranks");
  TORCH_CHECK(shapes.scalar_type() == torch::kLong && starts.scalar_type() == torch::kLong,
              "msda cpp backend: spatial shapes and level starts must be int64");
  TORCH_CHECK(loc.scalar_type() == value.scalar_type() && attn.scalar_type() == value.scalar_type(),
              "msda cpp backend: value, locations and weights must share a dtype");
}

}  // namespace

torch::Tensor msda_forward(torch::Tensor value, torch::Tensor shapes, torch::Tensor starts,
                           torch::Tensor loc, torch::Tensor attn) {
  check(value, shapes, starts, loc, attn);
  value = value.contiguous(); shapes = shapes.contiguous(); starts = starts.contiguous();
  loc = loc.contiguous(); attn = attn.contiguous();
  const int64_t B = value.size(0), S = value.size(1), M = value.size(2), D = value.size(3);
  const int64_t Q = loc.size(1), L = loc.size(3), P = loc.size(4);
  auto out = torch::empty({B, Q, M, D}, value.options());
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "msda_forward", [&] {
    forward_impl<scalar_t>(value.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(),
                           starts.data_ptr<int64_t>(), loc.data_ptr<scalar_t>(),
                           attn.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), B, S, M, D, Q, L, P);
  });
  return out.view({B, Q, M * D});
}

std::vector<torch::Tensor> msda_backward(torch::Tensor value, torch::Tensor shapes,
                                         torch::Tensor starts, torch::Tensor loc,
                                         torch::Tensor attn, torch::Tensor grad) {
  check(value, shapes, starts, loc, attn);
  value = value.contiguous(); shapes = shapes.contiguous(); starts = starts.contiguous();
  loc = loc.contiguous(); attn = attn.contiguous();
  grad = grad.to(value.scalar_type()).contiguous();
  const int64_t B = value.size(0), S = value.size(1), M = value.size(2), D = value.size(3);
  const int64_t Q = loc.size(1), L = loc.size(3), P = loc.size(4);
  TORCH_CHECK(grad.numel() == B * Q * M * D, "msda cpp backend: bad output gradient");
  auto g_value = torch::zeros_like(value);
  auto g_loc = torch::empty_like(loc);
  auto g_attn = torch::empty_like(attn);
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "msda_backward", [&] {
    backward_impl<scalar_t>(value.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(),
                            starts.data_ptr<int64_t>(), loc.data_ptr<scalar_t>(),
                            attn.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(),
                            g_value.data_ptr<scalar_t>(), g_loc.data_ptr<scalar_t>(),
                            g_attn.data_ptr<scalar_t>(), B, S, M, D, Q, L, P);
  });
  return {g_value, g_loc, g_attn};
}
"""

_CPP_DECLARATIONS = (
    "torch::Tensor msda_forward(torch::Tensor value, torch::Tensor shapes, torch::Tensor starts,"
    " torch::Tensor loc, torch::Tensor attn);\n"
    "std::vector<torch::Tensor> msda_backward(torch::Tensor value, torch::Tensor shapes,"
    " torch::Tensor starts, torch::Tensor loc, torch::Tensor attn, torch::Tensor grad);\n"
)

_EXTENSION = None
_FAILURE: "CppExtensionError | None" = None
_LOCK = threading.Lock()


class CppExtensionError(RuntimeError):
    """The C++ kernel could not be compiled or loaded (no compiler, no ninja, ...)."""


#: compiler flags of every build; the loops are plain C++ that the compiler vectorises
_BASE_FLAGS = ["-O3", "-fopenmp"]
#: where the CPU has AVX2 (torch's own dispatch says so), the same source is also built with AVX2 and
#: FMA instructions for wider vector loops; ``-ffp-contract=off`` keeps every multiply and add
#: separately rounded, so this build's results are bit-identical to the baseline build's (tested)
_AVX2_FLAGS = ["-mavx2", "-mfma", "-ffp-contract=off"]


def _builds():
    """``[(extension name, compiler flags), ...]`` to try in order on this machine: the AVX2 build
    first where the CPU has AVX2 (x86-64), then the baseline build."""
    import platform

    builds = [("tprd_msda_cpu", _BASE_FLAGS)]
    machine = platform.machine().lower()
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # an older torch without the query: baseline only
        capability = "DEFAULT"
    if machine in ("x86_64", "amd64") and capability in ("AVX2", "AVX512"):
        builds.insert(0, ("tprd_msda_cpu_avx2", _BASE_FLAGS + _AVX2_FLAGS))
    return builds


def _build(name: str, flags):
    from torch.utils import cpp_extension

    return cpp_extension.load_inline(
        name=name,
        cpp_sources=[_CPP_DECLARATIONS + _SOURCE],
        functions=["msda_forward", "msda_backward"],
        extra_cflags=list(flags),
        extra_ldflags=["-fopenmp"],
        verbose=False,
    )


def load_extension():
    """The compiled module (built on first call, then cached); :class:`CppExtensionError` with the
    reason and the fix when it cannot be built. A failure is remembered for the process."""
    global _EXTENSION, _FAILURE
    with _LOCK:
        if _EXTENSION is not None:
            return _EXTENSION
        if _FAILURE is not None:
            raise _FAILURE
        logger.info("deformable attention: loading its C++ CPU kernel (compiled on the first use on this machine, "
                    "about a minute; then cached in $TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions)")
        builds = _builds()
        for i, (name, flags) in enumerate(builds):
            try:
                _EXTENSION = _build(name, flags)
                return _EXTENSION
            except Exception as exc:  # compiler or ninja missing, build error, full disk
                if i + 1 < len(builds):
                    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
                    logger.info("deformable attention: the %s build of the C++ kernel failed (%s); trying the "
                                "baseline build", name, first_line)
                    continue
                _FAILURE = CppExtensionError(
                    "msda_backend='cpp' needs a C++ compiler (g++/clang++), ninja (`pip install ninja`) and "
                    f"a writable cache folder to build its CPU kernel; the build failed: {_build_error(exc)}\n"
                    "Use msda_backend='pytorch' (the pure-PyTorch path) instead."
                )
                raise _FAILURE from exc


def _build_error(exc: BaseException, keep: int = 1500) -> str:
    """The build error's first line and the end of the compiler's output, where the cause is
    (the start of a failed ninja build is only the commands it ran)."""
    text = f"{type(exc).__name__}: {str(exc).strip()}"
    if len(text) <= keep:
        return text
    first = text.splitlines()[0][:300]
    return f"{first}\n...\n{text[-keep:]}"


class _MSDACpp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        ext = load_extension()
        ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        return ext.msda_forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        value, shapes, starts, loc, attn = ctx.saved_tensors
        g_value, g_loc, g_attn = load_extension().msda_backward(value, shapes, starts, loc, attn, grad_out)
        need_value, _, _, need_loc, need_attn = ctx.needs_input_grad
        return (g_value if need_value else None, None, None,
                g_loc if need_loc else None, g_attn if need_attn else None)


def msda_cpp(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, sampling_locations: Tensor,
             attention_weights: Tensor) -> Tensor:
    """Backend ``"cpp"`` (same signature and result as the other backends; CPU tensors only)."""
    if value.device.type != "cpu":
        raise ValueError(f"msda_backend='cpp' runs on CPU tensors only (got {value.device}); "
                         "use 'auto' (Triton on CUDA) or 'pytorch'")
    dtype = value.dtype
    compute = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    out = _MSDACpp.apply(
        value.to(compute), spatial_shapes.long(), level_start_index.long(),
        sampling_locations.to(compute), attention_weights.to(compute),
    )
    return out.to(dtype)
