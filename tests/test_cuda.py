"""Checks that need a CUDA device (skipped without one; ``tools/gpu_check.py`` runs them on a GPU)."""
import pytest
import torch

from tprd.layers.msda_function import msda_function

from test_msda_function import SHAPES, STARTS, random_case

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
def test_triton_kernel_passes_its_first_use_check_on_this_gpu():
    pytest.importorskip("triton")
    from tprd.layers.msda_triton import self_check

    assert self_check(torch.device("cuda")) is None


@cuda
@pytest.mark.parametrize("backend", ["triton", "pytorch", "grid_sample"])
def test_cuda_backends_equal_the_cpu_function(backend):
    if backend == "triton":
        pytest.importorskip("triton")
    from tprd.layers.ms_deform_attn import multi_scale_deformable_attention

    value, loc, weights = random_case(torch.float32, seed=7)
    results = []
    for device in ("cpu", "cuda"):
        inputs = [t.to(device).requires_grad_(True) for t in (value, loc, weights)]
        fn = msda_function if device == "cpu" else (
            lambda v, s, st, l, w: multi_scale_deformable_attention(v, s, st, l, w, backend=backend))
        out = fn(inputs[0], SHAPES.to(device), STARTS.to(device), inputs[1], inputs[2])
        grad = torch.ones_like(out)
        results.append([t.cpu() for t in (out, *torch.autograd.grad(out, inputs, grad))])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


@cuda
def test_auto_on_cuda_is_a_gpu_backend():
    from tprd.layers.ms_deform_attn import resolve_msda_backend

    assert resolve_msda_backend("auto", torch.zeros(1, device="cuda")) in ("triton", "cuda_ext", "pytorch")
