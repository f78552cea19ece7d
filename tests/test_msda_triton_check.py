"""The first-use check of the Triton backend (tprd.layers.msda_triton.checked_msda_triton), on CPU.

The kernel is replaced by stand-ins: one that raises (a compile or launch error on a user's GPU),
one that computes wrong numbers, and a correct one. On a failure or mismatch the backend warns
once, naming the cause, and computes with the pure-PyTorch Function for the rest of the process;
a kernel that passes is used.
"""
import logging

import pytest
import torch

import tprd.layers.msda_triton as msda_triton_module
from tprd.layers.msda_function import msda_function
from tprd.layers.msda_triton import checked_msda_triton, self_check

from test_msda_function import SHAPES, STARTS, random_case

LOGGER = "tprd.layers.msda_triton"


@pytest.fixture(autouse=True)
def fresh_checks():
    msda_triton_module._reset_checks()
    yield
    msda_triton_module._reset_checks()


def _count_calls(fn, calls):
    def wrapped(*args):
        calls.append(1)
        return fn(*args)
    return wrapped


def _run(value, loc, weights):
    inputs = [t.clone().requires_grad_(True) for t in (value, loc, weights)]
    out = checked_msda_triton(inputs[0], SHAPES, STARTS, inputs[1], inputs[2])
    return [out, *torch.autograd.grad(out.sum(), inputs)]


def _reference(value, loc, weights):
    inputs = [t.clone().requires_grad_(True) for t in (value, loc, weights)]
    out = msda_function(inputs[0], SHAPES, STARTS, inputs[1], inputs[2])
    return [out, *torch.autograd.grad(out.sum(), inputs)]


def _broken(*args):
    raise RuntimeError("triton.compiler.errors.CompilationError: at 12:4: unsupported GPU architecture")


def _wrong(value, shapes, starts, loc, weights):
    return msda_function(value, shapes, starts, loc, weights) * 1.01


@pytest.mark.parametrize("kernel, cause", [(_broken, "CompilationError"), (_wrong, "differs from the PyTorch path")])
def test_failing_kernel_warns_once_and_falls_back(monkeypatch, caplog, kernel, cause):
    calls = []
    monkeypatch.setattr(msda_triton_module, "msda_triton", _count_calls(kernel, calls))
    value, loc, weights = random_case(torch.float32, seed=3)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        first = _run(value, loc, weights)
        second = _run(value, loc, weights)
    warnings = [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert cause in warnings[0] and "pure-PyTorch" in warnings[0] and "cpu" in warnings[0]
    assert len(calls) == 1  # only the check ran the kernel; the training calls took the fallback
    for got in (first, second):
        for a, b in zip(got, _reference(value, loc, weights)):
            torch.testing.assert_close(a, b)


def test_a_kernel_that_passes_is_used(monkeypatch, caplog):
    calls = []
    monkeypatch.setattr(msda_triton_module, "msda_triton", _count_calls(msda_function, calls))
    value, loc, weights = random_case(torch.float32, seed=4)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        _run(value, loc, weights)
        _run(value, loc, weights)
    assert not [r for r in caplog.records if r.name == LOGGER]
    assert len(calls) == 3  # the check, then both calls


def test_check_leaves_the_global_random_state_alone():
    state = torch.get_rng_state()
    assert self_check(torch.device("cpu"), kernel=msda_function) is None
    assert torch.equal(torch.get_rng_state(), state)


def test_check_reports_a_gradient_mismatch():
    class WrongBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, value, shapes, starts, loc, weights):
            ctx.save_for_backward(value, shapes, starts, loc, weights)
            return msda_function(value, shapes, starts, loc, weights)

        @staticmethod
        def backward(ctx, grad):
            value, shapes, starts, loc, weights = ctx.saved_tensors
            with torch.enable_grad():
                inputs = [t.detach().requires_grad_(True) for t in (value, loc, weights)]
                out = msda_function(inputs[0], shapes, starts, inputs[1], inputs[2])
                gv, gl, gw = torch.autograd.grad(out, inputs, grad)
            return gv, None, None, gl * 0.0, gw  # location gradient lost

    problem = self_check(torch.device("cpu"), kernel=WrongBackward.apply)
    assert problem is not None and "location gradient" in problem
