"""Decoder attention taps of the three detectors: asked for, not computed otherwise, pre-dropout,
cut per query group, aggregated the same way (splat for deformable layers, sums for dense ones)."""
import pytest
import torch
from torch import nn

from tprd.distill.attention import cross_attention_maps, self_attention_maps
from tprd.modeling.detector import multihead_attention_weights
from tprd.modeling.outputs import QueryGroup

from test_distiller import batch, tiny_dab, tiny_deformable, tiny_dino


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _group(make, model, name, n, seed):
    g = torch.Generator().manual_seed(seed)
    dim = model.embed_dim
    if make is tiny_deformable:
        return QueryGroup(name, torch.randn(2, n, dim, generator=g), torch.rand(2, n, 2, generator=g) * 0.8 + 0.1,
                          torch.randn(2, n, dim, generator=g))
    content = torch.zeros(2, n, dim) if make is tiny_dab else torch.randn(2, n, dim, generator=g)
    return QueryGroup(name, content, torch.rand(2, n, 4, generator=g) * 0.5 + 0.25)


def test_multihead_weights_are_taken_before_dropout():
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(16, 4, dropout=0.5, batch_first=True)
    q, k = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    mask = torch.zeros(5, 7, dtype=torch.bool)
    mask[:, 5:] = True
    attn.train()
    ours = multihead_attention_weights(attn, q, k, mask)
    attn.eval()  # without dropout torch's own weights are the softmax itself
    _, theirs = attn(q, k, k, attn_mask=mask, need_weights=True, average_attn_weights=False)
    assert ours.shape == (2, 4, 5, 7)
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert torch.allclose(ours.sum(-1), torch.ones(2, 4, 5)) and ours[..., 5:].abs().max() == 0


@pytest.mark.parametrize("make", [tiny_deformable, tiny_dab, tiny_dino])
def test_taps_only_when_asked_and_outputs_unchanged(make):
    model = make(seed=1).eval()
    images = model.preprocess(batch())
    with torch.no_grad():
        plain = model.forward_outputs(images)
        tapped = model.forward_outputs(images, return_attention=True)
    assert "decoder_self_attn" not in plain.taps and "decoder_cross_attn" not in plain.taps
    assert torch.equal(plain.main.logits, tapped.main.logits)
    assert len(tapped.taps["decoder_self_attn"]) == len(tapped.taps["decoder_cross_attn"]) == model.transformer.decoder.num_layers


@pytest.mark.parametrize("make", [tiny_deformable, tiny_dab, tiny_dino])
def test_group_maps_equal_the_group_decoded_alone(make):
    """Groups are decoded behind a block-diagonal mask, so the maps cut out for a group equal the
    maps of that group decoded on its own (as another model's 'main'-like pass would give)."""
    model = make(seed=1).eval()
    images = model.preprocess(batch())
    ga, gb = _group(make, model, "a", 5, 1), _group(make, model, "b", 3, 2)
    with torch.no_grad():
        both = model.forward_outputs(images, query_groups=[ga, gb], return_attention=True)
        alone = model.forward_outputs(images, query_groups=[ga], return_attention=True)
        plain = model.forward_outputs(images, return_attention=True)
    sa = self_attention_maps(both, "a")
    assert sa.shape == (model.transformer.decoder.num_layers, 2, 4, 5, 5)
    assert torch.allclose(sa, self_attention_maps(alone, "a"), atol=1e-5)
    assert torch.allclose(sa.sum(-1), torch.ones_like(sa.sum(-1)), atol=1e-5)  # rows stay inside the block
    assert torch.allclose(self_attention_maps(both, "main"), self_attention_maps(plain, "main"), atol=1e-5)
    for reduce, rows in (("head", 4), ("query", 5)):
        ca = cross_attention_maps(both, reduce, "a")
        assert ca.shape[:3] == (model.transformer.decoder.num_layers, 2, rows)
        assert torch.allclose(ca, cross_attention_maps(alone, reduce, "a"), atol=1e-5)
        assert torch.allclose(cross_attention_maps(both, reduce, "main"), cross_attention_maps(plain, reduce, "main"),
                              atol=1e-5)
    # only the requested layers are aggregated
    assert cross_attention_maps(both, "query", "b", layers=[1]).shape[0] == 1


def test_dense_cross_attention_maps_sum_to_the_query_and_head_counts():
    """DAB-DETR's decoder cross-attention is a softmax over the S memory tokens: per head the
    head-aggregated map sums to the group's query count, per query the query map to the heads."""
    model = tiny_dab(seed=1).eval()
    with torch.no_grad():
        out = model.forward_outputs(model.preprocess(batch()), return_attention=True)
    s = out.taps["memory"].shape[1]
    head = cross_attention_maps(out, "head")
    query = cross_attention_maps(out, "query")
    assert head.shape == (2, 2, 4, s) and query.shape == (2, 2, model.num_queries, s)
    assert torch.allclose(head.sum(-1), torch.full((2, 2, 4), float(model.num_queries)), atol=1e-4)
    assert torch.allclose(query.sum(-1), torch.full((2, 2, model.num_queries), 4.0), atol=1e-4)


def test_dino_denoising_queries_have_their_own_slice():
    model = tiny_dino(seed=1).train()
    inputs = batch()
    images, targets = model.preprocess(inputs), model.prepare_targets(inputs)
    out = model.forward_outputs(images, targets=targets, return_attention=True)
    slices = out.taps["group_slices"]
    assert "dn" in slices and slices["main"].stop - slices["main"].start == model.num_queries
    sa = self_attention_maps(out, "main")
    assert sa.shape[-1] == model.num_queries
    # in training the main block's rows still sum to 1: the main queries never see the dn queries
    assert torch.allclose(sa.sum(-1), torch.ones_like(sa.sum(-1)), atol=1e-5)


def test_deformable_head_map_mass_is_at_most_the_query_count():
    model = tiny_deformable(seed=1).eval()
    with torch.no_grad():
        out = model.forward_outputs(model.preprocess(batch()), return_attention=True)
    head = cross_attention_maps(out, "head")
    mass = head.sum(-1)
    assert (mass <= model.num_queries + 1e-4).all() and (mass > 0).all()
