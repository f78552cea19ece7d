"""The Triton MSDA kernel (forward + backward) against the pure-PyTorch Function, on CPU tensors
under Triton's interpreter (TRITON_INTERPRET=1, set in a subprocess before Triton is imported)."""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from tprd.layers.ms_deform_attn import available_msda_backends, resolve_msda_backend

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_TRITON = importlib.util.find_spec("triton") is not None

COMPARE = r"""
import sys, torch
from tprd.layers.msda_function import msda_function
from tprd.layers.msda_triton import msda_triton

def case(seed, batch, queries, heads, dh, shapes, points):
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(shapes)
    sizes = shapes.prod(1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    value = torch.randn(batch, int(sizes.sum()), heads, dh, generator=g)
    loc = torch.rand(batch, queries, heads, len(shapes), points, 2, generator=g) * 1.6 - 0.3  # some outside
    weights = torch.rand(batch, queries, heads, len(shapes), points, generator=g)
    results = []
    for fn in (msda_function, msda_triton):
        inputs = [t.clone().requires_grad_(True) for t in (value, loc, weights)]
        out = fn(inputs[0], shapes, starts, inputs[1], inputs[2])
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1))
        results.append([out, *torch.autograd.grad(out, inputs, grad)])
    for name, a, b in zip(("output", "value", "locations", "weights"), *results):
        err = (a - b).abs().max().item()
        if not torch.allclose(a, b, atol=1e-5, rtol=1e-5):
            sys.exit(f"{name}: max abs difference {err}")

# three levels incl. a 1 x 2 map; head dim 4 and a non-power-of-2 head dim (3); queries over one block
case(0, batch=2, queries=6, heads=3, dh=4, shapes=[[5, 7], [3, 4], [1, 2]], points=2)
case(1, batch=1, queries=37, heads=2, dh=3, shapes=[[4, 4], [2, 3]], points=3)
print("ok")
"""


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed (pip install triton)")
def test_triton_kernel_matches_pytorch_function_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run([sys.executable, "-c", COMPARE], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:] + run.stdout[-1000:]
    assert run.stdout.strip().endswith("ok")


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed (pip install triton)")
def test_triton_is_registered_for_cuda_only():
    assert "triton" in available_msda_backends()
    assert resolve_msda_backend("auto", torch.zeros(1)) in ("cpp", "pytorch")  # CPU tensors: a CPU kernel


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed (pip install triton)")
def test_auto_picks_triton_for_cuda_tensors():
    class CudaLike:  # what the dispatcher reads from a CUDA tensor
        is_cuda = True

    assert resolve_msda_backend("auto", CudaLike()) == "triton"
    assert resolve_msda_backend("pytorch", CudaLike()) == "pytorch"  # msda_backend override
