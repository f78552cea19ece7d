"""The MSDA autograd Function (backend "pytorch") against the grid_sample path, and gradcheck."""
import pytest
import torch

from tprd.layers.ms_deform_attn import (
    MultiScaleDeformableAttention,
    msda_pytorch,
    multi_scale_deformable_attention,
    resolve_msda_backend,
    set_msda_backend,
)
from tprd.layers.msda_function import MSDAFunction, bilinear_corners, msda_function

# three levels, one of them 1 x 2 (every sample near a border)
SHAPES = torch.tensor([[5, 7], [3, 4], [1, 2]])
STARTS = torch.tensor([0, 35, 47])
NUM_VALUE = 49


def random_case(dtype, seed=0, batch=2, queries=6, heads=3, dh=4, points=2, spread=1.6):
    """Locations in [-0.3, 1.3]: many corners (and whole points) fall outside the maps."""
    g = torch.Generator().manual_seed(seed)
    value = torch.randn(batch, NUM_VALUE, heads, dh, generator=g, dtype=dtype)
    loc = torch.rand(batch, queries, heads, 3, points, 2, generator=g, dtype=dtype) * spread - (spread - 1) / 2
    weights = torch.rand(batch, queries, heads, 3, points, generator=g, dtype=dtype)
    return value, loc, weights


def grads(fn, value, loc, weights, grad_out=None):
    inputs = [t.clone().requires_grad_(True) for t in (value, loc, weights)]
    out = fn(inputs[0], SHAPES, STARTS, inputs[1], inputs[2])
    if grad_out is None:
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    return (out, *torch.autograd.grad(out, inputs, grad_out))


def test_bilinear_corners_by_hand():
    # x = 0.3 in a 2-wide map -> pixel 0.1: corners x=0 (0.9) and x=1 (0.1); y = 0.5 in 1 row -> 0.0
    index, weight, dx, dy = bilinear_corners(torch.tensor([[0.3, 0.5]]), torch.tensor([1]), torch.tensor([2]))
    assert index.tolist() == [[0, 1, 0, 1]]  # the y=1 row is outside: clamped index, zero weight
    assert weight[0].tolist() == pytest.approx([0.9, 0.1, 0.0, 0.0])
    # d weight / d x_normalised = +-W * wy
    assert dx[0].tolist() == pytest.approx([-2.0, 2.0, 0.0, 0.0])
    assert dy[0].tolist() == pytest.approx([-0.9, -0.1, 0.0, 0.0])


def test_point_outside_every_map_samples_zero_with_zero_gradients():
    value, _, weights = random_case(torch.float64)
    loc = torch.full((2, 6, 3, 3, 2, 2), 1.8, dtype=torch.float64)  # beyond every border
    out, g_value, g_loc, g_w = grads(msda_function, value, loc, weights)
    assert torch.count_nonzero(out) == 0
    assert torch.count_nonzero(g_value) == 0 and torch.count_nonzero(g_loc) == 0 and torch.count_nonzero(g_w) == 0


@pytest.mark.parametrize("seed", [0, 1])
def test_forward_and_gradients_equal_grid_sample_path(seed):
    value, loc, weights = random_case(torch.float32, seed)
    expected = grads(msda_pytorch, value, loc, weights)
    got = grads(msda_function, value, loc, weights)
    for name, e, g in zip(("output", "value", "locations", "weights"), expected, got):
        assert torch.allclose(g, e, atol=1e-5, rtol=1e-5), name


def test_gradcheck_float64_several_levels_points_outside():
    value, loc, weights = random_case(torch.float64, seed=3, batch=1, queries=3, heads=2, dh=2)
    inputs = tuple(t.requires_grad_(True) for t in (value, loc, weights))
    assert torch.autograd.gradcheck(lambda v, l, w: MSDAFunction.apply(v, SHAPES, STARTS, l, w), inputs)


def test_function_saves_only_its_inputs():
    value, loc, weights = random_case(torch.float32)
    inputs = [t.requires_grad_(True) for t in (value, loc, weights)]
    out = msda_function(inputs[0], SHAPES, STARTS, inputs[1], inputs[2])
    saved = out.grad_fn.saved_tensors
    assert sum(t.numel() for t in saved) == sum(t.numel() for t in (value, SHAPES, STARTS, loc, weights))


class _Attend(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = MultiScaleDeformableAttention(embed_dim=8, num_heads=2, num_levels=3, num_points=2)

    def forward(self, q, v, ref):
        return self.attn(q, v, ref, SHAPES, STARTS)


def test_auto_is_a_cpu_kernel_on_cpu_and_grid_sample_when_tracing():
    value, loc, weights = random_case(torch.float32)
    assert resolve_msda_backend("auto", value) in ("cpp", "pytorch")  # cpp when it builds here
    module = _Attend().eval()
    args = (torch.randn(1, 4, 8), torch.randn(1, NUM_VALUE, 8), torch.rand(1, 4, 3, 2))
    with torch.no_grad():
        traced = torch.jit.trace(module, args)
        kinds = {n.kind() for n in traced.inlined_graph.nodes()}
        assert "aten::grid_sampler" in kinds and "prim::PythonOp" not in kinds
        assert torch.allclose(traced(*args), module(*args), atol=1e-6)
        exported = torch.export.export(module, args)
        assert any("grid_sampler" in str(n.target) for n in exported.graph.nodes)
        set_msda_backend("pytorch")  # what an export helper may force: still the traceable path
        try:
            kinds = {n.kind() for n in torch.jit.trace(module, args).inlined_graph.nodes()}
        finally:
            set_msda_backend("auto")
        assert "aten::grid_sampler" in kinds and "prim::PythonOp" not in kinds


def test_module_backend_override():
    attn = MultiScaleDeformableAttention(embed_dim=8, num_heads=2, num_levels=3, num_points=2,
                                         msda_backend="grid_sample")
    assert attn.msda_backend == "grid_sample"
    with pytest.raises(ValueError, match="msda_backend"):
        MultiScaleDeformableAttention(embed_dim=8, num_heads=2, msda_backend="nope")
    value, loc, weights = random_case(torch.float32)
    out = multi_scale_deformable_attention(value, SHAPES, STARTS, loc, weights, backend="grid_sample")
    assert torch.equal(out, msda_pytorch(value, SHAPES, STARTS, loc, weights))


def test_failed_cpp_build_names_the_cause_and_the_fallback(monkeypatch):
    """A failed build of the opt-in C++ kernel keeps the compiler's last lines (where the cause
    is), says how to fix it, and is remembered instead of rebuilt on every call."""
    from torch.utils import cpp_extension

    from tprd.layers import msda_cpp

    calls = []

    def failing_build(**kwargs):
        calls.append(kwargs["name"])
        commands = "\n".join(f"[{i}/2] c++ -O3 -c main.cpp -o main.o" for i in range(200))
        raise RuntimeError(f"Error building extension 'tprd_msda_cpu': {commands}\n"
                           "main.o: fatal error: No space left on device")

    monkeypatch.setattr(cpp_extension, "load_inline", failing_build)
    monkeypatch.setattr(msda_cpp, "_EXTENSION", None)
    monkeypatch.setattr(msda_cpp, "_FAILURE", None)
    for _ in range(2):
        with pytest.raises(msda_cpp.CppExtensionError) as info:
            msda_cpp.load_extension()
        message = str(info.value)
        assert "Error building extension 'tprd_msda_cpu'" in message
        assert "No space left on device" in message
        assert "msda_backend='pytorch'" in message
        assert len(message) < 2500
    # every build of this machine tried once (the AVX2 one first where the CPU has AVX2), then the
    # failure is remembered
    assert calls == [name for name, _ in msda_cpp._builds()]
    assert calls[-1] == "tprd_msda_cpu"
