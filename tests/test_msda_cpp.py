"""The C++ CPU kernel (backend "cpp") against the pure-PyTorch Function, gradcheck, and a model."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tprd.layers.ms_deform_attn import MultiScaleDeformableAttention, msda_pytorch
from tprd.layers.msda_cpp import CppExtensionError, load_extension, msda_cpp
from tprd.layers.msda_function import msda_function

from test_msda_function import SHAPES, STARTS, grads, random_case


@pytest.fixture(scope="module", autouse=True)
def extension():
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler on this machine: the cpp backend cannot be built")
    try:
        return load_extension()
    except CppExtensionError as exc:  # pragma: no cover - depends on the machine
        pytest.fail(f"a compiler is present but the kernel did not build: {exc}")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_forward_and_gradients_equal_the_function_and_grid_sample(seed):
    value, loc, weights = random_case(torch.float32, seed)
    reference = grads(msda_function, value, loc, weights)
    grid = grads(msda_pytorch, value, loc, weights)
    got = grads(msda_cpp, value, loc, weights)
    for name, r, g_, c in zip(("output", "value", "locations", "weights"), reference, grid, got):
        assert torch.allclose(c, r, atol=1e-5, rtol=1e-5), name
        assert torch.allclose(c, g_, atol=1e-5, rtol=1e-5), name


def test_gradcheck_float64_several_levels_points_outside():
    value, loc, weights = random_case(torch.float64, seed=4, batch=2, queries=3, heads=2, dh=3)
    inputs = tuple(t.requires_grad_(True) for t in (value, loc, weights))
    assert torch.autograd.gradcheck(lambda v, l, w: msda_cpp(v, SHAPES, STARTS, l, w), inputs)


def test_non_finite_and_far_locations_sample_zero():
    value, loc, weights = random_case(torch.float64, seed=5)
    loc[0, 0] = float("nan")
    loc[0, 1] = 1e30
    loc[1, 2] = -float("inf")
    out, g_value, g_loc, g_w = grads(msda_cpp, value, loc, weights)
    assert torch.isfinite(out).all() and torch.isfinite(g_value).all()
    # those queries sample nothing: zero output, zero location / weight gradients
    for b, q in ((0, 0), (0, 1), (1, 2)):
        assert torch.count_nonzero(out[b, q]) == 0
        assert torch.count_nonzero(g_loc[b, q]) == 0 and torch.count_nonzero(g_w[b, q]) == 0
    # the other queries agree with the Function
    keep = torch.ones(2, 6, dtype=torch.bool)
    keep[0, 0] = keep[0, 1] = keep[1, 2] = False
    ref = msda_function(value, SHAPES, STARTS, torch.where(torch.isfinite(loc), loc, 5.0), weights)
    assert torch.allclose(out[keep], ref[keep], atol=1e-12)


def test_bfloat16_is_computed_in_float32_and_returned_in_its_dtype():
    value, loc, weights = random_case(torch.float32, seed=6)
    out = msda_cpp(value.bfloat16(), SHAPES, STARTS, loc.bfloat16(), weights.bfloat16())
    ref = msda_function(value.bfloat16().float(), SHAPES, STARTS, loc.bfloat16().float(), weights.bfloat16().float())
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), ref, atol=2e-2, rtol=2e-2)


def test_threads_give_the_same_result():
    value, loc, weights = random_case(torch.float32, seed=7, batch=2, queries=40, heads=4)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = grads(msda_cpp, value, loc, weights)
        torch.set_num_threads(2)
        two = grads(msda_cpp, value, loc, weights)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, two):  # each output element is summed by one task in a fixed order
        assert torch.equal(a, b)


def test_module_with_cpp_backend_equals_default_backend():
    torch.manual_seed(0)
    attn = MultiScaleDeformableAttention(embed_dim=32, num_heads=4, num_levels=3, num_points=2)
    torch.nn.init.normal_(attn.sampling_offsets.weight, std=0.3)
    shapes = SHAPES
    starts = STARTS
    query = torch.randn(2, 7, 32)
    value = torch.randn(2, 49, 32)
    ref_points = torch.rand(2, 7, 3, 2)
    kwargs = dict(query=query, value=value, reference_points=ref_points, spatial_shapes=shapes,
                  level_start_index=starts)
    outs, grads_ = [], []
    for backend in ("pytorch", "cpp"):
        attn.msda_backend = backend
        attn.zero_grad()
        out = attn(**kwargs)
        out.square().sum().backward()
        outs.append(out)
        grads_.append([p.grad.clone() for p in attn.parameters()])
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    for a, b in zip(*grads_):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_non_cpu_tensors_are_refused_with_the_alternatives():
    with pytest.raises(ValueError, match="CPU tensors only"):
        msda_cpp(torch.empty(1, 1, 1, 1, device="meta"), SHAPES, STARTS, torch.empty(1, 1, 1, 3, 1, 2),
                 torch.empty(1, 1, 1, 3, 1))


def test_tracing_a_cpp_module_records_grid_sample():
    torch.manual_seed(0)
    attn = MultiScaleDeformableAttention(embed_dim=8, num_heads=2, num_levels=3, num_points=2, msda_backend="cpp")
    args = (torch.randn(1, 4, 8), torch.randn(1, 49, 8), torch.rand(1, 4, 3, 2), SHAPES, STARTS)
    with torch.no_grad():
        traced = torch.jit.trace(attn.eval(), args)
        kinds = {n.kind() for n in traced.inlined_graph.nodes()}
        assert "aten::grid_sampler" in kinds and "prim::PythonOp" not in kinds
        assert torch.allclose(traced(*args), attn(*args), atol=1e-6)


def test_environment_variable_sets_the_process_default():
    code = "from tprd.layers.ms_deform_attn import get_msda_backend; print(get_msda_backend())"
    ok = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        env={**os.environ, "TPRD_MSDA_BACKEND": "cpp"})
    assert ok.returncode == 0 and ok.stdout.strip() == "cpp"
    bad = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "TPRD_MSDA_BACKEND": "fast"})
    assert bad.returncode != 0 and "TPRD_MSDA_BACKEND='fast'" in bad.stderr and "cpp" in bad.stderr


def test_avx2_build_is_bit_identical_to_the_baseline_build(extension):
    """The AVX2 build (the default on CPUs that have AVX2) gives the baseline build's bits: forward
    and the three gradients, with 32 channels per head (the vector loops) and with 3 (their tails)."""
    from tprd.layers import msda_cpp

    builds = dict(msda_cpp._builds())
    if "tprd_msda_cpu_avx2" not in builds:
        pytest.skip("this CPU has no AVX2 (or is not x86-64): only the baseline build exists here")
    assert extension.__name__ == "tprd_msda_cpu_avx2"  # the default build on this machine
    baseline = msda_cpp._build("tprd_msda_cpu", builds["tprd_msda_cpu"])
    for seed, dh in ((0, 32), (1, 3)):
        value, loc, weights = random_case(torch.float32, seed, batch=2, queries=40, heads=4, dh=dh)
        grad = torch.randn(2, 40, 4 * dh, generator=torch.Generator().manual_seed(seed))
        results = []
        for ext in (extension, baseline):
            out = ext.msda_forward(value, SHAPES, STARTS, loc, weights)
            results.append([out, *ext.msda_backward(value, SHAPES, STARTS, loc, weights, grad)])
        for name, a, b in zip(("output", "value", "locations", "weights"), *results):
            assert torch.equal(a, b), name
