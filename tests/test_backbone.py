"""Backbone, neck and position embedding: key conversion, freezing, numerics vs the detrex fixture."""
import json
import math

import torch
import torchvision

from tprd.testing.fill import fill_state_dict
from tprd.layers.position_embedding import PositionEmbeddingSine, get_sine_pos_embed
from tprd.modeling.backbone import (
    ChannelMapper,
    ResNet,
    convert_detectron2_resnet_keys,
    convert_torchvision_resnet_keys,
)

PIXEL_MEAN = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
PIXEL_STD = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)


def _strip(sd, prefix):
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def test_backbone_and_neck_match_detrex_fixture(parity_dir):
    fixture = parity_dir / "deformable_detr"
    sd = fill_state_dict(json.loads((fixture / "keys.json").read_text()))
    backbone, neck = ResNet(18), ChannelMapper([128, 256, 512])
    backbone.load_state_dict(convert_detectron2_resnet_keys(_strip(sd, "backbone.")), strict=True)
    neck.load_state_dict(_strip(sd, "neck."), strict=True)
    image = torch.load(fixture / "input.pt", weights_only=False)["batched_inputs"][0]["image"]
    expected = torch.load(fixture / "intermediates.pt", weights_only=False)
    with torch.no_grad():
        feats = backbone(((image - PIXEL_MEAN) / PIXEL_STD)[None])
        outs = neck(feats)
    for name in ("res3", "res4", "res5"):
        torch.testing.assert_close(feats[name], expected["backbone"][name], atol=1e-4, rtol=1e-4)
    assert len(outs) == 4
    for ours, ref in zip(outs, expected["neck"]):
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_detectron2_key_conversion_names():
    sd = {
        "backbone.stem.conv1.weight": 0,
        "backbone.stem.conv1.norm.running_var": 1,
        "backbone.res2.0.conv3.norm.bias": 2,
        "backbone.res5.2.conv2.weight": 3,
        "teacher.backbone.res3.0.shortcut.weight": 4,
        "backbone.res4.0.shortcut.norm.weight": 5,
        "neck.convs.0.conv.weight": 6,
    }
    out = convert_detectron2_resnet_keys(sd)
    assert out == {
        "backbone.conv1.weight": 0,
        "backbone.bn1.running_var": 1,
        "backbone.layer1.0.bn3.bias": 2,
        "backbone.layer4.2.conv2.weight": 3,
        "teacher.backbone.layer2.0.downsample.0.weight": 4,
        "backbone.layer3.0.downsample.1.weight": 5,
        "neck.convs.0.conv.weight": 6,
    }


def test_torchvision_weights_load_and_fc_is_ignored():
    for depth, ctor in ((18, torchvision.models.resnet18), (50, torchvision.models.resnet50)):
        sd = ctor(weights=None).state_dict()
        assert any(k.startswith("fc.") for k in sd)
        ResNet(depth).load_state_dict(convert_torchvision_resnet_keys(sd), strict=True)


def test_freeze_at_and_output_shapes():
    net = ResNet(18, out_features=("res2", "res5"), freeze_at=2)
    assert not net.conv1.weight.requires_grad
    assert not any(p.requires_grad for p in net.layer1.parameters())
    assert all(p.requires_grad for p in net.layer2.parameters())
    out = net(torch.zeros(1, 3, 64, 96))
    assert list(out) == ["res2", "res5"]
    assert out["res2"].shape == (1, 64, 16, 24) and out["res5"].shape == (1, 512, 2, 3)
    assert net.out_channels["res5"] == 512 and ResNet(50).out_channels["res5"] == 2048


def test_sine_embedding_hand_computed_cell():
    # One image, 2x3 grid, right column padded: valid width 2, height 2.
    mask = torch.tensor([[[False, False, True], [False, False, True]]])
    emb = PositionEmbeddingSine(num_pos_feats=4, temperature=100, normalize=True, offset=-0.5)(mask)
    assert emb.shape == (1, 8, 2, 3)
    # Cell (row 1, col 0): y count 2 of 2, x count 1 of 2 (normaliser counts valid cells of the row).
    eps, scale = 1e-6, 2 * math.pi
    y = (2 - 0.5) / (2 + eps) * scale
    x = (1 - 0.5) / (2 + eps) * scale
    dims = [100 ** (2 * (i // 2) / 4) for i in range(4)]

    def channels(v):
        return [math.sin(v / dims[0]), math.cos(v / dims[1]), math.sin(v / dims[2]), math.cos(v / dims[3])]

    expected = torch.tensor(channels(y) + channels(x))
    torch.testing.assert_close(emb[0, :, 1, 0], expected, atol=1e-6, rtol=1e-6)


def test_sine_pos_embed_of_points_swaps_xy():
    pts = torch.tensor([[[0.25, 0.75]]])
    out = get_sine_pos_embed(pts, num_pos_feats=4, exchange_xy=True)
    y_first = get_sine_pos_embed(pts.flip(-1), num_pos_feats=4, exchange_xy=False)
    torch.testing.assert_close(out, y_first)
    assert math.isclose(out[0, 0, 0].item(), math.sin(0.75 * 2 * math.pi), rel_tol=1e-6)
