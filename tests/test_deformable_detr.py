"""Deformable DETR behaviour: training, padding masks, query groups, box refinement, two-stage."""
import pytest
import torch

from conftest import PARITY_DIR, padded_feature_pair
from tprd.layers.position_embedding import PositionEmbeddingSine
from tprd.modeling.backbone import ChannelMapper, ResNet
from tprd.modeling.criterion import SetCriterion
from tprd.modeling.deformable_detr import (
    DeformableDETR,
    DeformableTransformer,
    DeformableTransformerDecoder,
    DeformableTransformerEncoder,
    level_masks,
)
from tprd.modeling.matcher import HungarianMatcher
from tprd.modeling.outputs import QueryGroup

D, C, Q = 64, 3, 12


def tiny_model(with_box_refine=False, as_two_stage=False, mask_mode="exact", seed=0):
    torch.manual_seed(seed)
    layer_args = dict(embed_dim=D, num_heads=4, feedforward_dim=128, attn_dropout=0.0, ffn_dropout=0.0, num_layers=2)
    transformer = DeformableTransformer(
        DeformableTransformerEncoder(**layer_args), DeformableTransformerDecoder(**layer_args),
        as_two_stage=as_two_stage, num_feature_levels=4, two_stage_num_proposals=Q,
    )
    weights = {"loss_class": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}
    weights.update({k + s: v for k, v in list(weights.items()) for s in ("_0", "_enc")})
    return DeformableDETR(
        backbone=ResNet(depth=18, out_features=("res3", "res4", "res5"), freeze_at=1),
        position_embedding=PositionEmbeddingSine(D // 2, normalize=True, offset=-0.5),
        neck=ChannelMapper([128, 256, 512], out_channels=D, num_outs=4, kernel_size=1, num_groups=32),
        transformer=transformer, num_classes=C, num_queries=Q,
        criterion=SetCriterion(C, HungarianMatcher(), weights, two_stage_binary_cls=True),
        embed_dim=D, with_box_refine=with_box_refine, as_two_stage=as_two_stage,
        select_box_nums_for_evaluation=20, mask_mode=mask_mode, device="cpu",
    )


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    imgs = [torch.rand(3, 48, 64, generator=g) * 255, torch.rand(3, 32, 48, generator=g) * 255]
    return [
        {"image": imgs[0], "height": 96, "width": 128,
         "gt_boxes": torch.tensor([[10.0, 8.0, 40.0, 30.0], [30.0, 20.0, 60.0, 44.0]]), "gt_classes": torch.tensor([0, 2])},
        {"image": imgs[1], "height": 32, "width": 48,
         "gt_boxes": torch.tensor([[5.0, 5.0, 30.0, 20.0]]), "gt_classes": torch.tensor([1])},
    ]


def test_preprocess_and_targets():
    model = tiny_model()
    inputs = batch()
    images = model.preprocess(inputs)
    assert images.tensor.shape == (2, 3, 48, 64)
    assert images.image_sizes == [(48, 64), (32, 48)]
    assert not images.mask[0].any()
    assert images.mask[1, 32:].all() and images.mask[1, :, 48:].all() and not images.mask[1, :32, :48].any()
    assert (images.tensor[1, :, 32:] == 0).all()
    expected = (inputs[1]["image"][0, 3, 5] - 123.675) / 58.395
    assert images.tensor[1, 0, 3, 5].item() == pytest.approx(expected.item(), rel=1e-6)
    targets = model.prepare_targets(inputs)
    # image 1 (32 x 48): box [5,5,30,20] -> cx 17.5/48, cy 12.5/32, w 25/48, h 15/32
    assert targets[1]["boxes"][0].tolist() == pytest.approx([17.5 / 48, 12.5 / 32, 25 / 48, 15 / 32], rel=1e-6)
    assert targets[0]["labels"].tolist() == [0, 2]


def test_training_steps_lower_the_loss():
    model = tiny_model(with_box_refine=True)
    model.train()
    inputs = batch()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4)
    totals = []
    for _ in range(5):
        losses = model(inputs)
        total = sum(losses.values())
        opt.zero_grad()
        total.backward()
        opt.step()
        totals.append(total.item())
    assert set(losses) == {"loss_class", "loss_bbox", "loss_giou", "loss_class_0", "loss_bbox_0", "loss_giou_0"}
    assert all(torch.isfinite(torch.tensor(totals)))
    assert totals[-1] < totals[0] * 0.95, totals


def test_eval_detections_in_output_frame():
    model = tiny_model().eval()
    with torch.no_grad():
        results = model(batch())
    for res, (h, w) in zip(results, [(96, 128), (32, 48)]):
        assert set(res) == {"boxes", "scores", "labels"}
        assert res["labels"].dtype == torch.int64 and len(res["scores"]) <= 20
        b = res["boxes"]
        assert (b[:, 0] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 1] >= 0).all() and (b[:, 3] <= h).all()
        assert ((b[:, 2] - b[:, 0]) > 0).all() and ((b[:, 3] - b[:, 1]) > 0).all()
        assert (res["scores"][:-1] >= res["scores"][1:]).all()


def test_level_masks_nearest_quirk_and_exact():
    """detrex's nearest-resized mask marks the 3x4 level of a 128x192 image padded to 160x224 as all
    valid (PARITY.md); the exact mask has the 2x3 valid cells the image has alone."""
    mask = torch.ones(2, 160, 224, dtype=torch.bool)
    mask[0] = False
    mask[1, :128, :192] = False
    sizes = [(160, 224), (128, 192)]
    shapes = [(20, 28), (10, 14), (5, 7), (3, 4)]
    nearest = level_masks(mask, sizes, shapes, "nearest")
    exact = level_masks(mask, sizes, shapes, "exact")
    valid = [(16, 24), (8, 12), (4, 6)]
    for lvl, (vh, vw) in enumerate(valid):
        for m in (nearest, exact):
            assert (~m[lvl][1]).sum().item() == vh * vw
    assert not nearest[3][1].any()  # the quirk
    assert (~exact[3][1]).sum().item() == 2 * 3 and not exact[3][1, :2, :3].any()
    fixture = PARITY_DIR / "deformable_detr_train" / "intermediates.pt"
    if fixture.is_file():
        ref = torch.load(fixture, weights_only=False)["masks"]
        for m, r in zip(nearest, ref):
            assert torch.equal(m, r)


def _level_shapes(h, w):
    shapes, (h, w) = [], (h, w)
    for _ in range(3):
        h, w = -(-h // 2), -(-w // 2)
    for _ in range(4):
        shapes.append((h, w))
        h, w = -(-h // 2), -(-w // 2)
    return shapes


@pytest.mark.parametrize("refine", [False, True])
def test_padded_image_matches_image_alone_with_exact_masks(refine):
    """Same neck features, once alone and once padded into a larger batch: identical predictions.
    (CNN features themselves do change with padding; this isolates the transformer's masking.)"""
    model = tiny_model(with_box_refine=refine).eval()
    feats_alone, masks_alone, feats_batch, masks_batch = padded_feature_pair(D, _level_shapes)
    with torch.no_grad():
        alone = model.decode_memory(model.encode(feats_alone, masks_alone))
        batched = model.decode_memory(model.encode(feats_batch, masks_batch))
    assert torch.allclose(batched.main.logits[:, 1], alone.main.logits[:, 0], atol=1e-4)
    assert torch.allclose(batched.main.boxes[:, 1], alone.main.boxes[:, 0], atol=1e-5)


def _random_group(name, bsz, n, ref_dim, seed):
    g = torch.Generator().manual_seed(seed)
    return QueryGroup(name, content=torch.randn(bsz, n, D, generator=g), reference=torch.rand(bsz, n, ref_dim, generator=g) * 0.8 + 0.1,
                      position=torch.randn(bsz, n, D, generator=g))


@pytest.mark.parametrize("refine,two_stage", [(False, False), (True, False), (True, True)])
def test_query_groups_are_isolated(refine, two_stage):
    model = tiny_model(with_box_refine=refine, as_two_stage=two_stage).eval()
    ref_dim = 4 if two_stage else 2
    with torch.no_grad():
        enc, taps = model.encode_images(model.preprocess(batch()))
        plain = model.decode_memory(enc)
        ga, gb = _random_group("a", 2, 5, ref_dim, 1), _random_group("b", 2, 7, ref_dim, 2)
        grouped = model.decode_memory(enc, [ga, gb], return_attention=True)
        alone_a = model.decode(enc, ga)[0]
    assert torch.allclose(grouped.main.logits, plain.main.logits, atol=1e-5)
    assert torch.allclose(grouped.main.boxes, plain.main.boxes, atol=1e-6)
    assert torch.allclose(grouped.groups["a"].logits, alone_a.logits, atol=1e-5)
    assert torch.allclose(grouped.groups["a"].boxes, alone_a.boxes, atol=1e-6)
    assert grouped.groups["b"].logits.shape == (2, 2, 7, C)
    # the self-attention maps are block diagonal
    s = grouped.taps["group_slices"]
    attn = grouped.taps["decoder_self_attn"][0]
    assert attn.shape == (2, 4, Q + 12, Q + 12)
    assert attn[:, :, s["main"], s["a"]].abs().max() == 0 and attn[:, :, s["b"], s["main"]].abs().max() == 0
    assert torch.allclose(attn[:, :, s["a"], s["a"]].sum(-1), torch.ones(2, 4, 5))
    assert grouped.taps["decoder_cross_attn"][1]["sampling_locations"].shape[:2] == (2, Q + 12)


def test_own_queries_as_a_group_reproduce_main_predictions():
    model = tiny_model().eval()
    with torch.no_grad():
        enc, _ = model.encode_images(model.preprocess(batch()))
        plain = model.decode_memory(enc)
        q = plain.taps["queries"]
        copy = model.decode_memory(enc, [QueryGroup("copy", q.content, q.reference, q.position)])
        # references recomputed from the position when omitted
        derived = model.decode_memory(enc, [QueryGroup("copy", q.content, None, q.position)])
    assert torch.allclose(copy.groups["copy"].logits, plain.main.logits, atol=1e-5)
    assert torch.allclose(derived.groups["copy"].boxes, plain.main.boxes, atol=1e-6)


def test_box_refinement_chains_references():
    model = tiny_model(with_box_refine=True).train()
    out = model.forward_outputs(model.preprocess(batch()))
    refs = out.main.references  # layer 0 gets the 2-d point, layer 1 the box of layer 0
    assert refs[0].shape[-1] == 2 and refs[1].shape[-1] == 4
    assert torch.allclose(refs[1], out.main.boxes[0].detach())
    assert not refs[1].requires_grad
    assert len(model.class_embed) == 2 and model.class_embed[0] is not model.class_embed[1]


def test_two_stage_proposals_and_losses():
    model = tiny_model(with_box_refine=True, as_two_stage=True).train()
    images = model.preprocess(batch())
    out = model.forward_outputs(images)
    s = sum(h * w for h, w in out.taps["spatial_shapes"].tolist())
    assert out.enc["pred_logits"].shape == (2, s, C) and out.enc["topk_indices"].shape == (2, Q)
    # the queries start from the selected proposals (detached)
    ref = out.taps["queries"].reference
    sel = torch.gather(out.enc["pred_boxes"], 1, out.enc["topk_indices"][..., None].expand(-1, -1, 4))
    assert torch.allclose(ref, sel) and not ref.requires_grad
    # padded tokens carry "inf" (un-sigmoided) proposals, as in detrex
    assert torch.isinf(out.enc["pred_boxes_unact"][1][out.taps["memory_mask"][1]]).all()
    losses = model(batch())
    assert {"loss_class_enc", "loss_bbox_enc", "loss_giou_enc"} <= set(losses)
    sum(losses.values()).backward()
    assert model.transformer.enc_output.weight.grad is not None
    assert len(model.class_embed) == 3  # 2 decoder layers + the encoder head


def test_shared_heads_without_refinement():
    model = tiny_model()
    assert len(model.class_embed) == 1 and len(model.bbox_embed) == 1
    assert model.bbox_embed[0].layers[-1].bias[2:].tolist() == [-2.0, -2.0]
    assert model.class_embed[0].bias[0].item() == pytest.approx(-4.59512, abs=1e-4)


def test_refinement_heads_start_as_copies():
    model = tiny_model(with_box_refine=True)
    assert torch.equal(model.class_embed[0].weight, model.class_embed[1].weight)
    assert torch.equal(model.bbox_embed[0].layers[0].weight, model.bbox_embed[1].layers[0].weight)
    assert model.bbox_embed[0].layers[-1].bias[2:].tolist() == [-2.0, -2.0]
    assert model.bbox_embed[1].layers[-1].bias.tolist() == [0.0] * 4
