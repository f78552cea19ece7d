"""The lean dropouts equal the plain expressions: same draws, same outputs, same gradients, less kept."""
import pytest
import torch
import torch.nn.functional as F

from tprd.layers.lean_dropout import dropout, relu_dropout


def _run(fn, x0, seed, grad_out):
    x = x0.clone().requires_grad_(True)
    torch.manual_seed(seed)
    y = fn(x)
    y.backward(grad_out)
    return y.detach(), x.grad, torch.rand(3)  # the last: where the generator was left


CASES = [
    ("dropout", lambda x: dropout(x, 0.1, True), lambda x: F.dropout(x, 0.1, True)),
    ("dropout p=0.5", lambda x: dropout(x, 0.5, True), lambda x: F.dropout(x, 0.5, True)),
    ("relu_dropout", lambda x: relu_dropout(x, 0.1, True), lambda x: F.dropout(F.relu(x), 0.1, True)),
    ("relu_dropout p=0.3", lambda x: relu_dropout(x, 0.3, True), lambda x: F.dropout(F.relu(x), 0.3, True)),
]


@pytest.mark.parametrize("name,lean,plain", CASES, ids=[c[0] for c in CASES])
def test_bitwise_equal_to_plain(name, lean, plain):
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, 37, 64, generator=g)
    x0[0, :5] = 0.0  # exact zeros: relu's boundary
    grad_out = torch.randn(4, 37, 64, generator=g)
    y1, gx1, after1 = _run(lean, x0, 7, grad_out)
    y2, gx2, after2 = _run(plain, x0, 7, grad_out)
    assert torch.equal(y1, y2)
    assert torch.equal(gx1, gx2)
    assert torch.equal(after1, after2)  # the same number of draws
    assert 0 < (y1 == 0).float().mean() < 1


def test_gradcheck_double():
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    for fn in (dropout, relu_dropout):
        # Fixed draws: reseed before each evaluation, so the function is deterministic for gradcheck.
        def f(t, fn=fn):
            torch.manual_seed(3)
            return fn(t, 0.4, True)

        assert torch.autograd.gradcheck(f, (x,))


def _saved_bytes(fn, x):
    total = {}

    def pack(t):
        total[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return sum(total.values())


def test_keeps_less_for_backward():
    x = torch.randn(64, 1024, requires_grad=True)
    w = torch.nn.Linear(1024, 256)
    lean = _saved_bytes(lambda t: w(relu_dropout(t, 0.1, True)), x)
    plain = _saved_bytes(lambda t: w(F.dropout(F.relu(t), 0.1, True)), x)
    # Plain: relu output, float noise and dropout output (3 x 256 KiB) + linear's weight; lean: one.
    assert plain - lean >= 2 * x.numel() * 4
    lean = _saved_bytes(lambda t: dropout(t, 0.1, True) * 2, x)
    plain = _saved_bytes(lambda t: F.dropout(t, 0.1, True) * 2, x)
    assert lean * 4 <= plain + 64


def test_plain_path_outside_training():
    x = torch.randn(5, 6, requires_grad=True)
    assert torch.equal(dropout(x, 0.1, False), x)
    assert torch.equal(relu_dropout(x, 0.1, False), F.relu(x))
    assert torch.equal(relu_dropout(x, 0.0, True), F.relu(x))
    with torch.no_grad():
        torch.manual_seed(0)
        a = relu_dropout(x, 0.2, True)
        torch.manual_seed(0)
        b = F.dropout(F.relu(x), 0.2, True)
    assert torch.equal(a, b)


def test_switch_off_gives_the_plain_expressions():
    from tprd.layers.lean_dropout import set_lean_dropout

    x = torch.randn(64, 1024, requires_grad=True)
    w = torch.nn.Linear(1024, 256)
    plain = _saved_bytes(lambda t: w(F.dropout(F.relu(t), 0.1, True)), x)
    set_lean_dropout(False)
    try:
        off = _saved_bytes(lambda t: w(relu_dropout(t, 0.1, True)), x)
    finally:
        set_lean_dropout(True)
    assert off == plain
    assert _saved_bytes(lambda t: w(relu_dropout(t, 0.1, True)), x) < plain
