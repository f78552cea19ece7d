"""The default deformable-attention backend on CPU (``"auto"``): the C++ kernel when it builds, the
pure-PyTorch Function with one warning when it does not (tprd.layers.ms_deform_attn.cpu_backend).

The failed build is simulated twice: in this process by a loader that raises what a failed build
raises, and for real in a fresh process whose compiler (``$CXX``) does not exist and whose
extension cache is empty.
"""
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tprd.layers.ms_deform_attn as msda
import tprd.layers.msda_cpp as msda_cpp
from tprd.layers.ms_deform_attn import MultiScaleDeformableAttention, cpu_backend, resolve_msda_backend

from test_msda_function import SHAPES, STARTS

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def fresh_choice():
    msda._reset_cpu_backend()
    yield
    msda._reset_cpu_backend()


def _failing_loader(calls):
    def load():
        calls.append(1)
        raise msda_cpp.CppExtensionError(
            "msda_backend='cpp' needs a C++ compiler (g++/clang++), ninja (`pip install ninja`) and a writable "
            "cache folder to build its CPU kernel; the build failed: RuntimeError: Error building extension "
            "'tprd_msda_cpu': c++: command not found\nUse msda_backend='pytorch' (the pure-PyTorch path) instead."
        )
    return load


def test_auto_uses_the_cpp_kernel_when_it_loads(fresh_choice, monkeypatch):
    monkeypatch.setattr(msda_cpp, "load_extension", lambda: object())
    assert cpu_backend() == "cpp"
    assert resolve_msda_backend("auto", torch.zeros(1)) == "cpp"
    assert resolve_msda_backend("pytorch", torch.zeros(1)) == "pytorch"  # an explicit choice stays


def test_failed_build_falls_back_once_with_one_warning(fresh_choice, monkeypatch, caplog):
    calls = []
    monkeypatch.setattr(msda_cpp, "load_extension", _failing_loader(calls))
    attn = MultiScaleDeformableAttention(embed_dim=8, num_heads=2, num_levels=3, num_points=2)
    query, value, ref = torch.randn(2, 4, 8), torch.randn(2, int(SHAPES.prod(1).sum()), 8), torch.rand(2, 4, 3, 2)
    with caplog.at_level(logging.WARNING, logger="tprd.layers.ms_deform_attn"):
        out = attn(query, value, ref, SHAPES, STARTS)
        out.sum().backward()
        attn(query, value, ref, SHAPES, STARTS)
        assert resolve_msda_backend("auto", value) == "pytorch"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and len(calls) == 1  # decided once per process
    message = warnings[0].getMessage()
    assert "c++: command not found" in message and "pure-PyTorch" in message and "\n" not in message
    # the fallback computes what the pure-PyTorch backend computes
    attn.msda_backend = "pytorch"
    torch.testing.assert_close(out, attn(query, value, ref, SHAPES, STARTS))


CHECK = """
import logging, torch
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
from tprd.layers.ms_deform_attn import resolve_msda_backend
print("BACKEND", resolve_msda_backend("auto", torch.zeros(1)))
print("BACKEND", resolve_msda_backend("auto", torch.zeros(1)))
"""


def test_real_failed_build_without_a_compiler(tmp_path):
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"),
               OMP_NUM_THREADS="1")
    env.pop("TPRD_MSDA_BACKEND", None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    run = subprocess.run([sys.executable, "-c", CHECK], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["BACKEND", "pytorch", "BACKEND", "pytorch"]
    lines = run.stderr.strip().splitlines()
    warned = [l for l in lines if l.startswith("WARNING tprd.layers.ms_deform_attn")]
    assert len(warned) == 1, run.stderr[-3000:]
    assert "could not be built" in warned[0] and "pure-PyTorch" in warned[0]
    loading = [l for l in lines if "loading its C++ CPU kernel" in l]
    assert len(loading) == 1  # the one line while it tries to compile
