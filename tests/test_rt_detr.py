"""RT-DETRv2 behaviour beyond the parity fixtures: the toolbox entry points (batched_inputs of any
size, losses with denoising, detections), query groups, eval_idx, denoising queries and the
discrete sampling method. Parity with the reference: tests/test_rtdetr_parity.py."""
import pytest
import torch

from conftest import REPO
from tprd.config import LazyConfig, instantiate

SYNTHETIC = REPO / "projects" / "rt_detr" / "configs" / "rtdetrv2_r18vd_synthetic.py"


def _model(**overrides):
    cfg = LazyConfig.load(SYNTHETIC)
    cfg.model.device = "cpu"
    LazyConfig.apply_overrides(cfg, [f"model.{k}={v!r}" for k, v in overrides.items()])
    torch.manual_seed(0)
    return instantiate(cfg.model)


def _inputs(sizes=((100, 150), (128, 120)), seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, (h, w) in enumerate(sizes):
        boxes = torch.tensor([[10.0, 12.0, 60.0, 70.0], [30.0, 5.0, 90.0, 40.0]][: i + 1])
        out.append({"image": torch.rand(3, h, w, generator=g) * 255, "height": 2 * h, "width": 2 * w,
                    "gt_boxes": boxes, "gt_classes": torch.tensor([1, 3][: i + 1])})
    return out


def test_training_losses_with_denoising_named_as_the_reference():
    model = _model().train()
    losses = model(_inputs())
    base = ["loss_vfl", "loss_bbox", "loss_giou"]
    expected = base + [k + "_aux_0" for k in base] + [k + f"_dn_{i}" for i in range(2) for k in base] \
        + [k + "_enc_0" for k in base]
    assert list(losses) == expected
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    emb = model.decoder.denoising_class_embed.weight
    assert emb.grad is not None and emb.grad[-1].abs().sum() == 0  # the padding row gets no gradient
    assert model.decoder.enc_score_head.weight.grad.abs().sum() > 0


def test_eval_detections_and_padding():
    model = _model().eval()
    with torch.no_grad():
        images = model.preprocess(_inputs())
        assert tuple(images.tensor.shape[-2:]) == (128, 160)  # padded to multiples of 32
        dets = model(_inputs())
    assert len(dets) == 2 and all(d["scores"].shape == (50,) for d in dets)
    assert all(d["labels"].max() < 5 for d in dets)


def test_query_groups_do_not_change_the_main_predictions():
    model = _model().eval()
    images = model.preprocess(_inputs())
    g = torch.Generator().manual_seed(3)
    from tprd.modeling.outputs import QueryGroup

    group = QueryGroup("extra", torch.randn(7, 128, generator=g), torch.rand(7, 4, generator=g) * 0.5 + 0.25)
    with torch.no_grad():
        alone = model.forward_outputs(images)
        both = model.forward_outputs(images, [group], return_attention=True)
    torch.testing.assert_close(both.main.logits, alone.main.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both.main.boxes, alone.main.boxes, atol=1e-6, rtol=1e-6)
    assert both.groups["extra"].logits.shape == (2, 2, 7, 5)
    assert both.taps["decoder_cross_attn"][0]["sampling_locations"].shape == (2, 57, 4, 3, 4, 2)
    assert both.taps["decoder_self_attn"][0].shape == (2, 4, 57, 57)


def test_a_group_of_own_tokens_decodes_exactly_the_main_queries():
    """A group with no content and the model's own selected tokens and boxes is its main group again:
    the content a model takes at given tokens is what its own query selection takes there."""
    from tprd.modeling.outputs import QueryGroup

    model = _model().eval()
    images = model.preprocess(_inputs())
    with torch.no_grad():
        alone = model.forward_outputs(images)
        q = alone.taps["queries"]
        assert q.token_index.shape == q.reference.shape[:2]
        out = model.forward_outputs(images, [QueryGroup("own", None, q.reference, token_index=q.token_index)])
    torch.testing.assert_close(out.groups["own"].logits, alone.main.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.groups["own"].boxes, alone.main.boxes, atol=1e-6, rtol=1e-6)
    # another model's tokens: the content is this model's own features there, not the other's
    other = _model()
    torch.manual_seed(1)
    for p in other.parameters():
        p.data.normal_(0, 0.02)
    other.eval()
    with torch.no_grad():
        tq = other.forward_outputs(images).taps["queries"]
        mine = model.forward_outputs(images, [QueryGroup("t", None, tq.reference, token_index=tq.token_index)])
        theirs = model.forward_outputs(images, [QueryGroup("t", tq.content, tq.reference)])
        # decoding the main queries' own content at the other model's tokens and boxes
        feats = model.decoder.select(mine.taps["memory"], [tuple(s) for s in mine.taps["spatial_shapes"].tolist()])
        idx = tq.token_index.unsqueeze(-1).expand(-1, -1, feats["token_features"].shape[-1])
        by_hand = model.forward_outputs(images, [QueryGroup("t", feats["token_features"].gather(1, idx), tq.reference)])
    torch.testing.assert_close(mine.groups["t"].logits, by_hand.groups["t"].logits, atol=1e-5, rtol=1e-5)
    assert (mine.groups["t"].logits - theirs.groups["t"].logits).abs().max() > 1e-3
    with pytest.raises(ValueError, match="token_index .* must be"):
        model.forward_outputs(images, [QueryGroup("bad", None, tq.reference, token_index=tq.token_index[:1])])


def test_eval_stops_at_eval_idx_unless_all_layers_are_asked_for():
    model = _model(**{"decoder.eval_idx": 0}).eval()
    images = model.preprocess(_inputs())
    with torch.no_grad():
        short = model.forward_outputs(images)
        model.eval_all_layers = True
        full = model.forward_outputs(images)
        dets_full = model.inference(full, images.image_sizes)
        model.eval_all_layers = False
        dets_short = model.inference(short, images.image_sizes)
    assert short.main.logits.shape[0] == 1 and full.main.logits.shape[0] == 2
    torch.testing.assert_close(full.main.logits[0], short.main.logits[0])
    torch.testing.assert_close(dets_full[0]["scores"], dets_short[0]["scores"])


def test_denoising_group_layout_and_draw_order():
    from tprd.modeling.rtdetr_decoder import contrastive_denoising_group

    emb = torch.nn.Embedding(6, 8, padding_idx=5)
    targets = [{"labels": torch.tensor([0, 4, 1]), "boxes": torch.tensor([[.3, .5, .2, .2], [.5, .5, .4, .3],
                                                                             [.7, .2, .1, .1]])},
               {"labels": torch.tensor([2]), "boxes": torch.tensor([[.4, .4, .3, .3]])}]
    torch.manual_seed(0)
    content, ref, mask, meta = contrastive_denoising_group(targets, 5, 10, emb, num_denoising=7)
    # 7 // 3 = 2 groups of 3 positive + 3 negative slots
    assert content.shape == (2, 12, 8) and ref.shape == (2, 12, 4) and mask.shape == (22, 22)
    assert meta["dn_num_group"] == 2 and meta["dn_num_split"] == [12, 10]
    assert meta["dn_positive_idx"][0].tolist() == [0, 1, 2, 6, 7, 8]
    assert meta["dn_positive_idx"][1].tolist() == [0, 6]
    assert mask[12:, :12].all() and not mask[12:, 12:].any()
    assert mask[:6, 6:12].all() and mask[6:12, :6].all() and not mask[:6, :6].any()
    # replaying the four draws gives the same noisy classes (padding slots keep the padding class)
    torch.manual_seed(0)
    flip = torch.rand(2, 12) < 0.25
    new = torch.randint_like(flip, 0, 5, dtype=torch.int32)
    base = torch.tensor([[0, 4, 1], [2, 5, 5]], dtype=torch.int32).tile(1, 4)
    real = base != 5
    classes = torch.where(flip & real, new, base)
    torch.testing.assert_close(content, emb(classes))
    assert torch.equal(content[1, 1], emb.weight[5])  # padded slots look up the padding row


def test_discrete_sampling_picks_cell_round_of_location_times_size():
    """``discrete`` reads cell ``floor(loc * (w, h) + 0.5)`` (the reference's rounding): the same value
    as bilinear sampling at that cell's centre."""
    from tprd.modeling.rtdetr_decoder import deformable_attention_v2

    g = torch.Generator().manual_seed(0)
    shapes = [(4, 6), (2, 3)]
    value = torch.randn(1, 4 * 6 + 2 * 3, 2, 5, generator=g)
    cells = [(1, 2, 0), (3, 5, 0), (0, 1, 1)]  # (y, x, level); level 0 has 2 points, level 1 has 1

    def locations(shift):
        loc = torch.tensor([[(x + shift) / shapes[l][1], (y + shift) / shapes[l][0]] for y, x, l in cells])
        return loc.view(1, 1, 1, 3, 2).expand(1, 1, 2, 3, 2).contiguous()

    w = torch.softmax(torch.randn(1, 1, 2, 3, generator=g), -1)
    centre = deformable_attention_v2(value, shapes, locations(0.5), w, [2, 1], "default")
    for shift in (-0.4, 0.0, 0.3):
        torch.testing.assert_close(deformable_attention_v2(value, shapes, locations(shift), w, [2, 1], "discrete"),
                                   centre)


def test_discrete_method_freezes_offsets():
    model = _model(**{"decoder.cross_attn_method": "discrete"})
    off = model.decoder.decoder.layers[0].cross_attn.sampling_offsets
    assert not off.weight.requires_grad and not off.bias.requires_grad
    model.eval()
    with torch.no_grad():
        assert len(model(_inputs())) == 2


def test_matcher_match_stages_equals_per_stage_matching():
    from tprd.modeling.rtdetr_criterion import RTDETRHungarianMatcher

    g = torch.Generator().manual_seed(1)
    logits, boxes = torch.randn(3, 2, 10, 5, generator=g), torch.rand(3, 2, 10, 4, generator=g) * 0.4 + 0.2
    targets = [{"labels": torch.tensor([1, 2]), "boxes": torch.tensor([[.3, .3, .2, .2], [.6, .6, .3, .2]])},
               {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]
    matcher = RTDETRHungarianMatcher({"cost_class": 2, "cost_bbox": 5, "cost_giou": 2})
    stages = matcher.match_stages(logits, boxes, targets)
    for l in range(3):
        for (a, b), (c, d) in zip(stages[l], matcher(logits[l], boxes[l], targets)):
            assert torch.equal(a, c) and torch.equal(b, d)
    assert stages[0][1][0].numel() == 0


def test_training_without_ground_truth():
    """An image without boxes, and a batch without any (one dummy denoising slot), train."""
    model = _model().train()
    inputs = _inputs()
    inputs[1]["gt_boxes"], inputs[1]["gt_classes"] = torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64)
    sum(model(inputs).values()).backward()
    for x in inputs:
        x["gt_boxes"], x["gt_classes"] = torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64)
    losses = model(inputs)
    assert len(losses) == 15 and losses["loss_bbox"].item() == 0.0
    sum(losses.values()).backward()


def test_coco_category_ids_match_the_catalog():
    from tprd.data.catalog import COCO_CATEGORIES
    from tprd.modeling.rtdetr_criterion import COCO_CATEGORY_IDS

    assert list(COCO_CATEGORY_IDS) == [cid for cid, _ in COCO_CATEGORIES]
