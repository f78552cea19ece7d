"""Repacked saved tensors (lean_attention_saves, saved_as_sum): the same outputs and gradients bit for
bit, less kept for backward, and out of the way of anybody else's saved-tensor hooks."""
import contextlib

import pytest
import torch
from torch import nn

import test_deformable_detr
import test_dino
from test_activation_checkpoint import losses_and_grads, with_dropout
from tprd.layers import lean_dropout
from tprd.layers import ms_deform_attn
from tprd.layers.activation_checkpoint import set_layer_options
from tprd.layers.lean_dropout import lean_attention_saves
from tprd.layers.ms_deform_attn import MultiScaleDeformableAttention, set_sum_recipe
from tprd.modeling import deformable_detr


def bits_equal(a, b):
    return torch.equal(a, b) and torch.equal(torch.signbit(a), torch.signbit(b))


class Observer:
    """An accounting pack hook (``observer = True``): records the unique storages kept."""

    def __init__(self):
        self.kept = {}

        def pack(t):
            self.kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        pack.observer = True
        self.hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)

    def __enter__(self):
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)

    @property
    def nbytes(self):
        return sum(self.kept.values())


def mha_step(mha, x, pos, grad, context, seed=3):
    mha.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    with Observer() as obs:
        q = x + pos
        with context():
            out = mha(q, q, x, need_weights=False)[0]
    out.backward(grad)
    grads = [x.grad] + [p.grad for p in mha.parameters()]
    return out.detach(), grads, torch.rand(3), obs.nbytes


def test_attention_saves_are_exact_and_smaller():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(64, 4, dropout=0.2, batch_first=True).train()
    x, pos, grad = torch.randn(2, 100, 64), torch.randn(2, 100, 64), torch.randn(2, 100, 64)
    plain = mha_step(mha, x, pos, grad, contextlib.nullcontext)
    lean = mha_step(mha, x, pos, grad, lean_attention_saves)
    assert bits_equal(plain[0], lean[0])
    for a, b in zip(plain[1], lean[1]):
        assert bits_equal(a, b)
    assert torch.equal(plain[2], lean[2])  # the same random draws
    attention = 2 * 4 * 100 * 100  # [B, heads, Q, K]
    # plain keeps P, N, D (4 bytes each); lean P and a byte mask
    assert plain[3] - lean[3] == attention * (12 - 5)


def test_attention_saves_with_a_mask_and_in_double():
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(32, 2, dropout=0.5, batch_first=True).double().train()
    x, pos, grad = (torch.randn(3, 90, 32, dtype=torch.float64) for _ in range(3))
    mask = torch.zeros(90, 90, dtype=torch.bool)
    mask[:45, 45:] = mask[45:, :45] = True  # two groups (block-diagonal, as query groups)
    def run(context):
        mha.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_(True)
        torch.manual_seed(4)
        with context():
            out = mha(xx + pos, xx + pos, xx, attn_mask=mask, need_weights=False)[0]
        out.backward(grad)
        return [out.detach(), xx.grad] + [p.grad for p in mha.parameters()]
    for a, b in zip(run(contextlib.nullcontext), run(lean_attention_saves)):
        assert bits_equal(a, b)


def test_attention_saves_step_aside_for_other_hooks():
    mha = nn.MultiheadAttention(64, 4, dropout=0.2, batch_first=True).train()
    x = torch.randn(2, 100, 64, requires_grad=True)
    seen = []

    def pack(t):
        seen.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with lean_attention_saves():
            mha(x, x, x, need_weights=False)
    # the outer (non-observer) hook saw every saved tensor, floats noise included
    assert any(t.shape == (2, 4, 100, 100) and not t.requires_grad for t in seen)
    with torch.no_grad():
        assert isinstance(lean_attention_saves(), contextlib.nullcontext)
    lean_dropout.set_lean_dropout(False)
    try:
        assert isinstance(lean_attention_saves(), contextlib.nullcontext)
    finally:
        lean_dropout.set_lean_dropout(True)


def msda_step(attn, query, pos, value, refs, shapes, starts, grad):
    attn.zero_grad(set_to_none=True)
    query, value = query.clone().requires_grad_(True), value.clone().requires_grad_(True)
    with Observer() as obs:
        out = attn(query, value, refs, shapes, starts, query_pos=pos)
    out.backward(grad)
    return [out.detach(), query.grad, value.grad] + [p.grad for p in attn.parameters()], obs.nbytes


def test_sum_recipe_is_exact_and_smaller():
    torch.manual_seed(0)
    attn = MultiScaleDeformableAttention(64, 4, 2, 2)
    nn.init.normal_(attn.sampling_offsets.weight, std=0.1)
    nn.init.normal_(attn.attention_weights.weight, std=0.1)
    shapes = torch.tensor([[8, 8], [4, 4]])
    starts = torch.tensor([0, 64])
    n = 80
    query, pos, value = torch.randn(2, n, 64), torch.randn(2, n, 64), torch.randn(2, n, 64)
    pos.requires_grad_(True)  # a learned level embedding is in it
    refs = torch.rand(2, n, 2, 2)
    grad = torch.randn(2, n, 64)
    lean, lean_bytes = msda_step(attn, query, pos, value, refs, shapes, starts, grad)
    pos_grad = pos.grad.clone()
    pos.grad = None
    set_sum_recipe(False)
    try:
        plain, plain_bytes = msda_step(attn, query, pos, value, refs, shapes, starts, grad)
    finally:
        set_sum_recipe(True)
    for a, b in zip(plain, lean):
        assert bits_equal(a, b)
    assert bits_equal(pos.grad, pos_grad)
    # the sum [2, n, 64] is no longer kept; its terms: the query (a leaf here, so counted) and pos
    assert plain_bytes - lean_bytes == 2 * n * 64 * 4 - 2 * (2 * n * 64 * 4)


def test_sum_recipe_refuses_a_term_changed_in_place():
    attn = MultiScaleDeformableAttention(32, 2, 1, 2)
    query = torch.randn(1, 16, 32, requires_grad=True)
    pos = torch.randn(1, 16, 32)
    out = attn(query, query, torch.rand(1, 16, 1, 2), torch.tensor([[4, 4]]), torch.tensor([0]), query_pos=pos)
    pos.add_(1)
    with pytest.raises(RuntimeError, match="modified in place"):
        out.sum().backward()


@pytest.mark.parametrize("build", [
    lambda: (test_deformable_detr.tiny_model(with_box_refine=True), test_deformable_detr.batch()),
    lambda: (test_dino.tiny_model(), test_dino.batch()),
], ids=["deformable_detr", "dino"])
@pytest.mark.parametrize("use_checkpoint", [False, "encoder_attention", True])
def test_detector_step_is_bit_identical(build, use_checkpoint, monkeypatch):
    """A training step of a detector, every repack on (also on the tiny attentions), equals the plain
    path: losses and every parameter's gradient bit for bit; with checkpointing as well."""
    monkeypatch.setattr(lean_dropout, "_MIN_NUMEL", 1)
    model, data = build()
    model = with_dropout(model).train()
    set_layer_options(model, use_checkpoint=use_checkpoint)
    lean_losses, lean_grads = losses_and_grads(model, data, seed=5)
    set_sum_recipe(False)
    monkeypatch.setattr(deformable_detr, "lean_attention_saves", contextlib.nullcontext)
    try:
        plain_losses, plain_grads = losses_and_grads(model, data, seed=5)
    finally:
        set_sum_recipe(True)
    assert lean_losses.keys() == plain_losses.keys() and lean_grads.keys() == plain_grads.keys()
    for k in plain_losses:
        assert bits_equal(lean_losses[k], plain_losses[k]), k
    for n in plain_grads:
        assert bits_equal(lean_grads[n], plain_grads[n]), n


def test_detector_keeps_less(monkeypatch):
    monkeypatch.setattr(lean_dropout, "_MIN_NUMEL", 1)
    model, data = test_deformable_detr.tiny_model(), test_deformable_detr.batch()
    model = with_dropout(model).train()

    def kept():
        with Observer() as obs:
            losses = model(data)
        del losses
        return obs.nbytes

    lean = kept()
    set_sum_recipe(False)
    monkeypatch.setattr(deformable_detr, "lean_attention_saves", contextlib.nullcontext)
    try:
        plain = kept()
    finally:
        set_sum_recipe(True)
    assert lean < plain
