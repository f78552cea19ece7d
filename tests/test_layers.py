"""Deformable attention, sine position embedding and MLP against hand-computed values."""
import math

import pytest
import torch

from tprd.layers import (
    MultiScaleDeformableAttention,
    get_msda_backend,
    msda_pytorch,
    multi_scale_deformable_attention,
    register_msda_backend,
    set_msda_backend,
)
from tprd.layers.mlp import MLP
from tprd.layers.position_embedding import PositionEmbeddingSine

# value map of one level, one head, one channel:  [[1, 2],
#                                                  [3, 4]]
VALUE_2x2 = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1, 1)
SHAPES_2x2 = torch.tensor([[2, 2]])
START_0 = torch.tensor([0])


def sample(loc_xy, value=VALUE_2x2, shapes=SHAPES_2x2, starts=START_0, weights=None):
    """One query, one head, len(loc_xy) points on one level."""
    loc = torch.tensor(loc_xy, dtype=torch.float32).view(1, 1, 1, 1, len(loc_xy), 2)
    if weights is None:
        weights = torch.full((1, 1, 1, 1, len(loc_xy)), 1.0 / len(loc_xy))
    return msda_pytorch(value, shapes, starts, loc, weights).item()


@pytest.mark.parametrize(
    "loc, expected",
    [
        ((0.25, 0.25), 1.0),  # centre of pixel (0, 0)
        ((0.75, 0.25), 2.0),  # centre of pixel (1, 0)
        ((0.25, 0.75), 3.0),
        ((0.5, 0.5), 2.5),  # midway between all four centres
        ((0.5, 0.25), 1.5),  # between the two top pixels
        ((1.0, 0.5), 1.5),  # half a pixel right of the last column: half of (2+4)/2, half zero padding
        ((0.0, 0.0), 0.25),  # the top-left corner: a quarter of pixel (0, 0)
        ((1.5, 0.5), 0.0),  # far outside: zero
    ],
)
def test_bilinear_sampling_hand_computed(loc, expected):
    assert sample([loc]) == pytest.approx(expected, abs=1e-6)


def test_attention_weights_levels_and_points_combine_linearly():
    # level 0: the 2x2 map; level 1: a 1x1 map holding 10
    value = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0]).view(1, 5, 1, 1)
    shapes = torch.tensor([[2, 2], [1, 1]])
    starts = torch.tensor([0, 4])
    loc = torch.tensor([[(0.25, 0.25), (0.75, 0.75)], [(0.5, 0.5), (0.5, 0.5)]]).view(1, 1, 1, 2, 2, 2)
    weights = torch.tensor([[0.1, 0.2], [0.3, 0.4]]).view(1, 1, 1, 2, 2)
    out = msda_pytorch(value, shapes, starts, loc, weights).item()
    assert out == pytest.approx(0.1 * 1 + 0.2 * 4 + 0.3 * 10 + 0.4 * 10, abs=1e-6)


def test_heads_use_their_own_channels():
    # two heads of 1 channel: head 0 sees [[1,2],[3,4]], head 1 sees [[10,20],[30,40]]
    v = torch.tensor([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [4.0, 40.0]]).view(1, 4, 2, 1)
    loc = torch.tensor([(0.25, 0.25), (0.75, 0.75)]).view(1, 1, 2, 1, 1, 2)
    w = torch.ones(1, 1, 2, 1, 1)
    out = msda_pytorch(v, SHAPES_2x2, START_0, loc, w)
    assert out.shape == (1, 1, 2)
    assert out.flatten().tolist() == pytest.approx([1.0, 40.0])


def _identity_module(num_points=1):
    attn = MultiScaleDeformableAttention(embed_dim=1, num_heads=1, num_levels=1, num_points=num_points)
    with torch.no_grad():
        attn.sampling_offsets.weight.zero_()
        attn.attention_weights.weight.zero_()
        attn.attention_weights.bias.zero_()
        for lin in (attn.value_proj, attn.output_proj):
            lin.weight.fill_(1.0)
            lin.bias.zero_()
    return attn


def test_module_offsets_are_in_pixels_of_each_level():
    attn = _identity_module()
    with torch.no_grad():
        attn.sampling_offsets.bias.copy_(torch.tensor([1.0, 0.0]))  # one pixel to the right
    value = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1)
    query = torch.zeros(1, 1, 1)
    ref = torch.tensor([0.25, 0.25]).view(1, 1, 1, 2)  # centre of pixel (0, 0)
    out = attn(query, value, ref, SHAPES_2x2, START_0)
    assert out.item() == pytest.approx(2.0, abs=1e-6)
    # a box reference: offset scaled by w/2 / num_points -> 1 * 0.5 * 0.5 = +0.25 in x
    ref_box = torch.tensor([0.25, 0.25, 0.5, 0.5]).view(1, 1, 1, 4)
    out = attn(query, value, ref_box, SHAPES_2x2, START_0)
    assert out.item() == pytest.approx(1.5, abs=1e-6)


def test_module_padding_mask_zeroes_values_and_returns_sampling():
    attn = _identity_module()
    with torch.no_grad():
        attn.sampling_offsets.bias.zero_()
    value = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1)
    mask = torch.tensor([[False, True, False, True]])  # right column is padding
    ref = torch.tensor([0.5, 0.25]).view(1, 1, 1, 2)  # between pixels (0,0) and (1,0)
    out, maps = attn(torch.zeros(1, 1, 1), value, ref, SHAPES_2x2, START_0, value_padding_mask=mask,
                     return_sampling=True)
    assert out.item() == pytest.approx(0.5, abs=1e-6)
    assert maps["sampling_locations"].shape == (1, 1, 1, 1, 1, 2)
    assert maps["attention_weights"].shape == (1, 1, 1, 1, 1)
    assert maps["sampling_locations"].flatten().tolist() == pytest.approx([0.5, 0.25])


def test_module_init_matches_deformable_detr():
    attn = MultiScaleDeformableAttention(embed_dim=32, num_heads=4, num_levels=2, num_points=3)
    bias = attn.sampling_offsets.bias.view(4, 2, 3, 2)
    # head 0 points along +x, head 1 along +y, head 2 along -x; point p at distance p+1
    assert bias[0, 1, 2].tolist() == pytest.approx([3.0, 0.0], abs=1e-6)
    assert bias[1, 0, 0].tolist() == pytest.approx([0.0, 1.0], abs=1e-6)
    assert bias[2, 0, 1].tolist() == pytest.approx([-2.0, 0.0], abs=1e-6)
    assert torch.count_nonzero(attn.sampling_offsets.weight) == 0
    assert torch.count_nonzero(attn.attention_weights.weight) == 0


def test_backend_registry_dispatch():
    calls = []

    def fake(value, shapes, starts, loc, weights):
        calls.append(1)
        return msda_pytorch(value, shapes, starts, loc, weights)

    register_msda_backend("test_fake", fake, cuda_only=False)
    before = get_msda_backend()
    try:
        set_msda_backend("test_fake")
        loc = torch.tensor([(0.25, 0.25)]).view(1, 1, 1, 1, 1, 2)
        out = multi_scale_deformable_attention(VALUE_2x2, SHAPES_2x2, START_0, loc, torch.ones(1, 1, 1, 1, 1))
        assert calls and out.item() == pytest.approx(1.0)
        with pytest.raises(ValueError, match="unknown"):
            set_msda_backend("no_such_kernel")
    finally:
        set_msda_backend(before)


def test_msda_gradients_flow_to_locations_and_values():
    value = VALUE_2x2.clone().requires_grad_(True)
    loc = torch.tensor([(0.4, 0.4)]).view(1, 1, 1, 1, 1, 2).requires_grad_(True)
    out = msda_pytorch(value, SHAPES_2x2, START_0, loc, torch.ones(1, 1, 1, 1, 1))
    out.backward()
    # pixel coords x = y = 0.3: bilinear weights 0.7*0.7, 0.3*0.7, 0.7*0.3, 0.3*0.3
    assert value.grad.flatten().tolist() == pytest.approx([0.49, 0.21, 0.21, 0.09], abs=1e-6)
    # d out / d x = W * ((2-1)*0.7 + (4-3)*0.3) = 2 * 1 = 2 ; d/dy = H * ((3-1)*0.7 + (4-2)*0.3) = 4
    assert loc.grad.flatten().tolist() == pytest.approx([2.0, 4.0], abs=1e-5)


# ---------------------------------------------------------------------------------------------
# sine position embedding
# ---------------------------------------------------------------------------------------------


def test_sine_embedding_hand_computed_with_padding():
    pe = PositionEmbeddingSine(num_pos_feats=4, temperature=100, normalize=True, offset=-0.5)
    mask = torch.tensor([[[False, False, True], [False, False, True]]])  # 2x3, last column padding
    pos = pe(mask)
    assert pos.shape == (1, 8, 2, 3)
    scale, eps = 2 * math.pi, 1e-6
    # dim_t = 100 ** (2 * (i // 2) / 4) = [1, 1, 10, 10]
    for row in range(2):
        for col in range(2):
            y = (row + 1 - 0.5) / (2 + eps) * scale
            x = (col + 1 - 0.5) / (2 + eps) * scale
            expected = [math.sin(y), math.cos(y), math.sin(y / 10), math.cos(y / 10),
                        math.sin(x), math.cos(x), math.sin(x / 10), math.cos(x / 10)]
            assert pos[0, :, row, col].tolist() == pytest.approx(expected, abs=1e-5)


def test_sine_embedding_unnormalised_counts_valid_cells():
    pe = PositionEmbeddingSine(num_pos_feats=2, temperature=10000, normalize=False)
    mask = torch.zeros(1, 1, 3, dtype=torch.bool)
    pos = pe(mask)
    # y channels: row index 1 -> sin(1), cos(1); x channels: 1, 2, 3
    assert pos[0, 0, 0].tolist() == pytest.approx([math.sin(1.0)] * 3, abs=1e-6)
    assert pos[0, 2, 0].tolist() == pytest.approx([math.sin(1.0), math.sin(2.0), math.sin(3.0)], abs=1e-6)
    assert pos[0, 3, 0].tolist() == pytest.approx([math.cos(1.0), math.cos(2.0), math.cos(3.0)], abs=1e-6)


# ---------------------------------------------------------------------------------------------
# MLP
# ---------------------------------------------------------------------------------------------


def test_mlp_relu_between_layers_only():
    mlp = MLP(2, 2, 1, 2)
    assert [n for n, _ in mlp.named_parameters()] == ["layers.0.weight", "layers.0.bias", "layers.1.weight",
                                                       "layers.1.bias"]
    with torch.no_grad():
        mlp.layers[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, -1.0]]))
        mlp.layers[0].bias.zero_()
        mlp.layers[1].weight.copy_(torch.tensor([[1.0, 1.0]]))
        mlp.layers[1].bias.fill_(-5.0)
    # hidden = relu([3, -4]) = [3, 0]; out = 3 - 5 = -2 (no ReLU on the output)
    assert mlp(torch.tensor([3.0, 4.0])).item() == pytest.approx(-2.0)
