"""DAB-DETR: detrex parity, checkpoint keys, query groups, padding masks, training."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from tprd.layers.position_embedding import PositionEmbeddingSine
from tprd.modeling.dab_detr import (
    DABDETR,
    DabDetrTransformer,
    DabDetrTransformerDecoder,
    DabDetrTransformerEncoder,
)
from tprd.modeling.outputs import QueryGroup
from tprd.checkpoint.detrex import adapter_for

from conftest import DETREX_KEYS_DIR, PARITY_DIR, REPO, filled_fixture_model

FIXTURE = PARITY_DIR / "dab_detr"
ATOL = RTOL = 1e-4


def _load(name):
    return torch.load(FIXTURE / name, weights_only=False)


@pytest.fixture(scope="module")
def fixture_model():
    """The reduced fixture model with the crc32-randn-v1 fill, loaded strictly, in eval mode."""
    return filled_fixture_model("dab_detr")


@pytest.fixture(scope="module")
def fixture_run(fixture_model):
    inputs = _load("input.pt")["batched_inputs"]
    with torch.no_grad():
        images = fixture_model.preprocess(inputs)
        outputs = fixture_model.forward_outputs(images)
    return inputs, images, outputs


def _close(name, ours, ref, atol=ATOL, rtol=RTOL):
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    diff = (ours - ref).abs().max().item()
    assert torch.allclose(ours, ref, atol=atol, rtol=rtol), f"{name}: max abs diff {diff:.3g}"


# ------------------------------------------------------------------------------------------------
# Parity with detrex
# ------------------------------------------------------------------------------------------------
def test_fill_checksums_after_conversion(fixture_model):
    """Every detrex key's value reaches our model (aliases included) with the fixture's checksums."""
    sums = json.loads((FIXTURE / "fill_checksums.json").read_text())
    ours = fixture_model.state_dict()
    mapped = adapter_for(DABDETR).to_ours({k: torch.zeros(1) for k in sums})
    assert len(set(mapped)) == len(ours)
    for key, (s, sa, first) in sums.items():
        new = next(iter(adapter_for(DABDETR).to_ours({key: torch.zeros(1)})))
        t = ours[new].double()
        assert math.isclose(t.sum().item(), s, rel_tol=1e-6, abs_tol=1e-6), key
        assert math.isclose(t.abs().sum().item(), sa, rel_tol=1e-6, abs_tol=1e-6), key
        assert math.isclose(t.flatten()[0].item(), first, rel_tol=1e-6, abs_tol=1e-7), key


def test_parity_intermediates(fixture_run):
    _, _, out = fixture_run
    ref = _load("intermediates.pt")
    for name, t in ref["backbone"].items():
        _close(f"backbone.{name}", out.taps["backbone"][name], t)
    _close("input_proj", out.taps["neck"][0], ref["input_proj"])
    hidden, references = ref["transformer_outputs"]
    _close("hidden_states", out.main.hidden, hidden)
    _close("reference_boxes", out.main.references, references)


def test_parity_predictions(fixture_run):
    _, _, out = fixture_run
    ref = _load("outputs.pt")
    _close("all_layers_pred_logits", out.main.logits, ref["all_layers_pred_logits"])
    _close("all_layers_pred_boxes", out.main.boxes, ref["all_layers_pred_boxes"])
    _close("pred_logits", out.main.logits[-1], ref["pred_logits"])
    _close("pred_boxes", out.main.boxes[-1], ref["pred_boxes"])
    for i, aux in enumerate(ref["aux_outputs"]):
        _close(f"aux_{i}.pred_logits", out.main.logits[i], aux["pred_logits"])
        _close(f"aux_{i}.pred_boxes", out.main.boxes[i], aux["pred_boxes"])


def _tie_blocks(scores, gap=1e-5):
    """Split a descending score list into runs whose adjacent gaps are below ``gap`` (ties)."""
    blocks, start = [], 0
    for i in range(1, len(scores) + 1):
        if i == len(scores) or scores[i - 1] - scores[i] > gap:
            blocks.append(range(start, i))
            start = i
    return blocks


def _assert_detections_match(ours, ref, box_atol):
    assert ours["labels"].shape == ref["labels"].shape
    _close("scores", ours["scores"], ref["scores"])
    for block in _tie_blocks(ref["scores"].tolist()):
        idx = list(block)
        if len(idx) == 1:
            i = idx[0]
            assert ours["labels"][i] == ref["labels"][i], f"label at rank {i}"
            _close(f"box at rank {i}", ours["boxes"][i], ref["boxes"][i], atol=box_atol)
        else:  # a tie: compare the block as a set of (label, box)
            key = lambda d: sorted(idx, key=lambda j: (int(d["labels"][j]), round(float(d["boxes"][j, 0]), 1)))
            for a, b in zip(key(ours), key(ref)):
                assert ours["labels"][a] == ref["labels"][b]
                _close(f"tied box {a}", ours["boxes"][a], ref["boxes"][b], atol=box_atol)


def test_parity_detections(fixture_model, fixture_run):
    inputs, images, out = fixture_run
    ref = _load("outputs.pt")
    before = fixture_model.inference(out, images.image_sizes)
    for ours, r in zip(before, ref["detections_before_detector_postprocess"]):
        _assert_detections_match(ours, r, box_atol=1e-3)
    with torch.no_grad():
        dets = fixture_model(inputs)
    for ours, r in zip(dets, ref["detections"]):
        _assert_detections_match(ours, r, box_atol=1e-3)
        h, w = r["image_size"]
        assert (ours["boxes"][:, 0::2] <= w).all() and (ours["boxes"][:, 1::2] <= h).all()


# ------------------------------------------------------------------------------------------------
# Checkpoint keys
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "config, keys",
    [
        ("projects/dab_detr/configs/models/dab_detr_r50.py", "dab_detr_r50.json"),
        ("projects/dab_detr/configs/models/dab_detr_r18.py", "dab_detr_r18_student.json"),
    ],
)
def test_detrex_key_lists_load_strictly(config, keys):
    from tprd.config import LazyConfig, instantiate

    cfg = LazyConfig.load(str(REPO / config))
    assert cfg.model.num_classes == 80
    model = instantiate(cfg.model)
    rows = json.loads((DETREX_KEYS_DIR / keys).read_text())
    sd = {k: torch.zeros(shape, dtype=getattr(torch, dtype)) for k, shape, dtype in rows}
    converted = adapter_for(DABDETR).to_ours(sd)
    result = model.load_state_dict(converted, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    # aliases collapse: 2 per layer pair of the PReLU (12) + 6 bbox_embed entries
    assert len(converted) == len(rows) - 18
    assert sum(p.numel() for p in model.parameters()) == {
        "dab_detr_r50.json": 43_668_690,
        "dab_detr_r18_student.json": 30_987_474,
    }[keys]


def test_convert_rejects_diverging_aliases():
    sd = {"bbox_embed.layers.0.bias": torch.zeros(3), "transformer.decoder.bbox_embed.layers.0.bias": torch.ones(3)}
    with pytest.raises(ValueError, match="shared tensor"):
        adapter_for(DABDETR).to_ours(sd)
    # an alias alone is renamed, not dropped
    only = {"transformer.decoder.bbox_embed.layers.0.bias": torch.ones(3)}
    assert list(adapter_for(DABDETR).to_ours(only)) == ["bbox_embed.layers.0.bias"]


def test_convert_key_names():
    conv = adapter_for(DABDETR).to_ours(
        {
            "backbone.res2.0.conv1.norm.running_var": torch.ones(1),
            "transformer.encoder.layers.3.attentions.0.attn.in_proj_weight": torch.ones(1),
            "transformer.encoder.layers.3.norms.1.weight": torch.ones(1),
            "transformer.decoder.layers.0.attentions.1.query_pos_sine_proj.bias": torch.ones(1),
            "transformer.decoder.layers.5.ffns.0.layers.0.1.weight": torch.ones(1),
            "transformer.decoder.layers.5.ffns.0.layers.1.bias": torch.ones(1),
            "anchor_box_embed.weight": torch.ones(1),
        }
    )
    assert list(conv) == [
        "backbone.layer1.0.bn1.running_var",
        "transformer.encoder.layers.3.self_attn.in_proj_weight",
        "transformer.encoder.layers.3.norm2.weight",
        "transformer.decoder.layers.0.cross_attn.query_pos_sine_proj.bias",
        "transformer.decoder.layers.5.ffn.activation.weight",
        "transformer.decoder.layers.5.ffn.linear2.bias",
        "anchor_box_embed.weight",
    ]


# ------------------------------------------------------------------------------------------------
# A tiny model for behaviour tests
# ------------------------------------------------------------------------------------------------
class PatchBackbone(nn.Module):
    """Stride-32 patchify conv: no receptive field across 32x32 blocks, so padding is harmless."""

    def __init__(self, channels=16):
        super().__init__()
        self.conv = nn.Conv2d(3, channels, kernel_size=32, stride=32)

    def forward(self, x):
        return {"res5": self.conv(x)}


def tiny_model(num_classes=3, num_queries=6, mask_decoder_memory=False, criterion=None, seed=0):
    torch.manual_seed(seed)
    d = 64
    enc = DabDetrTransformerEncoder(embed_dim=d, num_heads=4, feedforward_dim=96, num_layers=2, activation=nn.PReLU())
    dec = DabDetrTransformerDecoder(embed_dim=d, num_heads=4, feedforward_dim=96, num_layers=3, activation=nn.PReLU())
    model = DABDETR(
        backbone=PatchBackbone(16),
        transformer=DabDetrTransformer(enc, dec),
        position_embedding=PositionEmbeddingSine(num_pos_feats=d // 2, temperature=20, normalize=True),
        num_classes=num_classes,
        num_queries=num_queries,
        criterion=criterion,
        in_channels=16,
        embed_dim=d,
        select_box_nums_for_evaluation=10,
        mask_decoder_memory=mask_decoder_memory,
    )
    with torch.no_grad():  # make the heads non-trivial (detrex zero-initialises the box delta)
        for p in model.bbox_embed.layers[-1].parameters():
            p.normal_(0, 0.1)
    return model


def _image(seed, h, w):
    return torch.rand((3, h, w), generator=torch.Generator().manual_seed(seed)) * 255.0


# ------------------------------------------------------------------------------------------------
# Query groups
# ------------------------------------------------------------------------------------------------
def test_query_group_copy_of_main_reproduces_main(fixture_model, fixture_run):
    """A group made of the model's own anchors and zero content predicts exactly like the main group,
    and decoding it does not change the main group."""
    _, images, out = fixture_run
    anchors = out.taps["queries"]
    assert torch.allclose(anchors, fixture_model.anchor_box_embed.weight.sigmoid())
    group = QueryGroup("copy", content=torch.zeros(anchors.shape[0], 256), reference=anchors)
    with torch.no_grad():
        both = fixture_model.forward_outputs(images, [group])
    for name in ("logits", "boxes", "hidden", "references"):
        _close(f"main.{name}", getattr(both.main, name), getattr(out.main, name), atol=1e-5, rtol=0)
        _close(f"copy.{name}", getattr(both.groups["copy"], name), getattr(out.main, name), atol=1e-5, rtol=0)


def test_query_groups_do_not_interact():
    model = tiny_model().eval()
    inputs = [{"image": _image(1, 96, 128), "height": 96, "width": 128},
              {"image": _image(2, 96, 128), "height": 96, "width": 128}]
    g = torch.Generator().manual_seed(5)
    ga = QueryGroup("a", content=torch.randn(2, 7, 64, generator=g), reference=torch.rand(2, 7, 4, generator=g) * 0.8 + 0.1)
    gb = QueryGroup("b", content=torch.zeros(4, 64), reference=torch.rand(4, 4, generator=g) * 0.8 + 0.1)
    with torch.no_grad():
        images = model.preprocess(inputs)
        alone = model.forward_outputs(images)
        with_a = model.forward_outputs(images, [ga])
        with_ab = model.forward_outputs(images, [ga, gb])
        with_b = model.forward_outputs(images, [gb])
        # group "a" decoded alone: directly through the decoder, without the main queries
        enc = model.encode(images)
        h, r = model.transformer.decoder(ga.content, ga.reference, enc["memory"], enc["memory_pos"], model.bbox_embed)
        a_logits = model.class_embed(h)
    for o in (with_a, with_ab, with_b):
        _close("main logits", o.main.logits, alone.main.logits, atol=1e-5, rtol=0)
        _close("main boxes", o.main.boxes, alone.main.boxes, atol=1e-5, rtol=0)
    _close("a with b", with_ab.groups["a"].logits, with_a.groups["a"].logits, atol=1e-5, rtol=0)
    _close("b with a", with_ab.groups["b"].boxes, with_b.groups["b"].boxes, atol=1e-5, rtol=0)
    _close("a alone", with_a.groups["a"].logits, a_logits, atol=1e-5, rtol=0)
    _close("a refs", with_a.groups["a"].references, r, atol=1e-5, rtol=0)
    assert with_ab.groups["a"].logits.shape == (3, 2, 7, 3)
    assert with_ab.groups["b"].boxes.shape == (3, 2, 4, 4)
    assert with_ab.groups["b"].references[0].shape == (2, 4, 4)
    # without the block-diagonal mask the groups would interact: check the test can fail
    with torch.no_grad():
        mixed, _ = model.transformer.decoder(
            torch.cat([torch.zeros(2, 6, 64), ga.content], 1),
            torch.cat([model.initial_anchors().expand(2, -1, -1), ga.reference], 1),
            enc["memory"], enc["memory_pos"], model.bbox_embed,
        )
    assert not torch.allclose(mixed[:, :, :6], alone.main.hidden, atol=1e-3)


# ------------------------------------------------------------------------------------------------
# Inputs and padding
# ------------------------------------------------------------------------------------------------
def test_preprocess_and_targets():
    model = tiny_model()
    a, b = _image(1, 64, 96), _image(2, 96, 32)
    inputs = [
        {"image": a, "height": 64, "width": 96, "gt_boxes": torch.tensor([[0.0, 0.0, 48.0, 32.0]]), "gt_classes": torch.tensor([2])},
        {"image": b, "height": 96, "width": 32, "gt_boxes": torch.tensor([[8.0, 24.0, 24.0, 96.0]]), "gt_classes": torch.tensor([0])},
    ]
    for mode in (True, False):
        model.train(mode)
        images = model.preprocess(inputs)
        assert images.tensor.shape == (2, 3, 96, 96)
        assert images.image_sizes == [(64, 96), (96, 32)]
        assert not images.mask[0, :64].any() and images.mask[0, 64:].all()
        assert not images.mask[1, :, :32].any() and images.mask[1, :, 32:].all()
        assert (images.tensor[1, :, :, 32:] == 0).all()
        mean = torch.tensor([123.675, 116.280, 103.530]).view(3, 1, 1)
        std = torch.tensor([58.395, 57.120, 57.375]).view(3, 1, 1)
        assert torch.allclose(images.tensor[0, :, :64], (a - mean) / std)
    targets = model.prepare_targets(inputs)
    assert torch.allclose(targets[0]["boxes"], torch.tensor([[0.25, 0.25, 0.5, 0.5]]))
    assert torch.allclose(targets[1]["boxes"], torch.tensor([[0.5, 0.625, 0.5, 0.75]]))
    assert targets[1]["labels"].tolist() == [0] and targets[1]["labels"].dtype == torch.int64


def test_padded_batch_matches_single_image():
    """With correct masks (decoder memory masked too), a padded image gives its unpadded detections."""
    model = tiny_model(mask_decoder_memory=True).eval()
    big = {"image": _image(1, 128, 160), "height": 256, "width": 320}
    small = {"image": _image(2, 64, 96), "height": 128, "width": 192}
    with torch.no_grad():
        pair = model([big, small])
        alone = model([small])
        enc_pair = model.encode(model.preprocess([big, small]))
        enc_alone = model.encode(model.preprocess([small]))
    assert enc_pair["neck_masks"][0][1].tolist() == [[c >= 3 or r >= 2 for c in range(5)] for r in range(4)]
    valid = ~enc_pair["memory_mask"][1]
    _close("memory", enc_pair["memory"][1][valid], enc_alone["memory"][0], atol=1e-5, rtol=0)
    for k in ("scores", "boxes"):
        _close(k, pair[1][k], alone[0][k], atol=1e-4, rtol=0)
    assert torch.equal(pair[1]["labels"], alone[0]["labels"])
    assert (pair[1]["boxes"][:, 0::2] <= 192).all() and (pair[1]["boxes"][:, 1::2] <= 128).all()


def test_decoder_memory_unmasked_by_default_as_detrex():
    """detrex's decoder attends to padded memory tokens; only the encoder is masked."""
    model = tiny_model().eval()
    big = {"image": _image(1, 128, 160), "height": 128, "width": 160}
    small = {"image": _image(2, 64, 96), "height": 64, "width": 96}
    with torch.no_grad():
        enc_pair = model.encode(model.preprocess([big, small]))
        enc_alone = model.encode(model.preprocess([small]))
        pair = model([big, small])
        alone = model([small])
    valid = ~enc_pair["memory_mask"][1]
    _close("memory", enc_pair["memory"][1][valid], enc_alone["memory"][0], atol=1e-5, rtol=0)
    assert not torch.allclose(pair[1]["scores"], alone[0]["scores"], atol=1e-4)


# ------------------------------------------------------------------------------------------------
# Initialisation
# ------------------------------------------------------------------------------------------------
def test_init_and_trainable_anchor_centres():
    model = tiny_model(num_queries=50)
    model.bbox_embed.layers[-1].reset_parameters()
    model.init_weights()
    assert torch.allclose(model.class_embed.bias, torch.full((3,), -math.log(99.0)))
    assert (model.bbox_embed.layers[-1].weight == 0).all() and (model.bbox_embed.layers[-1].bias == 0).all()
    centres = model.anchor_box_embed.weight[:, :2].sigmoid()
    assert 0.0 < centres.min() and centres.max() < 1.0 and centres.std() > 0.15  # ~uniform(0,1)
    # the reference's "freeze" of the centres is a no-op: they receive gradients
    model.train()
    images = model.preprocess([{"image": _image(3, 64, 64), "height": 64, "width": 64}])
    out = model.forward_outputs(images)
    out.main.boxes.sum().backward()
    assert model.anchor_box_embed.weight.requires_grad
    assert model.anchor_box_embed.weight.grad[:, :2].abs().sum() > 0


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------
def _criterion(num_layers=3):
    from tprd.modeling.criterion import SetCriterion
    from tprd.modeling.matcher import HungarianMatcher

    weights = {"loss_class": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}
    weights.update({f"{k}_{i}": v for i in range(num_layers - 1) for k, v in list(weights.items())})
    return SetCriterion(num_classes=3, matcher=HungarianMatcher(), weight_dict=weights)


def _train_batch():
    return [
        {"image": _image(11, 96, 128), "height": 96, "width": 128,
         "gt_boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [70.0, 20.0, 120.0, 50.0]]),
         "gt_classes": torch.tensor([0, 2])},
        {"image": _image(12, 64, 96), "height": 64, "width": 96,
         "gt_boxes": torch.tensor([[20.0, 8.0, 80.0, 40.0]]), "gt_classes": torch.tensor([1])},
    ]


def test_training_losses_are_weighted_and_named():
    model = tiny_model(criterion=_criterion()).train()
    batch = _train_batch()
    torch.manual_seed(0)
    losses = model(batch)
    assert list(losses) == [
        "loss_class", "loss_bbox", "loss_giou",
        "loss_class_0", "loss_bbox_0", "loss_giou_0",
        "loss_class_1", "loss_bbox_1", "loss_giou_1",
    ]
    with torch.no_grad():
        outputs = model.forward_outputs(model.preprocess(batch))
        raw = model.criterion(outputs, model.prepare_targets(batch))
    for k, v in losses.items():
        w = 1.0 if k.startswith("loss_class") else (5.0 if k.startswith("loss_bbox") else 2.0)
        assert torch.allclose(v.detach(), raw[k] * w, rtol=1e-5, atol=1e-6), k
    model.aux_loss = False
    assert list(model(batch)) == ["loss_class", "loss_bbox", "loss_giou"]


def test_a_few_training_steps_lower_the_loss():
    model = tiny_model(criterion=_criterion()).train()
    batch = _train_batch()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    totals = []
    for _ in range(8):
        loss = sum(model(batch).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        totals.append(loss.item())
    assert all(math.isfinite(t) for t in totals)
    assert totals[-1] < 0.8 * totals[0], totals


def test_gradient_paths_follow_detrex():
    """detrex's DabDetrTransformerDecoder: the refined boxes are detached before they become the next
    layer's anchors (``reference_boxes = new_reference_boxes.detach()``), while the stacked
    references that the per-stage boxes are built on keep their graph. So no hidden state or class
    logit depends on the box head, but the references of stages >= 1 (and hence the stage-l box loss)
    do, and the anchor table gets gradients."""
    model = tiny_model().train()
    images = model.preprocess([{"image": _image(3, 96, 128), "height": 96, "width": 128}])
    out = model.forward_outputs(images)
    head = list(model.bbox_embed.parameters())

    def grads(t, params):
        return torch.autograd.grad(t.sum(), params, retain_graph=True, allow_unused=True)

    for name, t in (("hidden", out.main.hidden), ("logits", out.main.logits)):
        assert all(g is None or g.abs().max() == 0 for g in grads(t, head)), name
    assert all(g is None or g.abs().max() == 0 for g in grads(out.main.references[0], head))
    for l in (1, 2):
        assert sum(g.abs().sum() for g in grads(out.main.references[l], head) if g is not None) > 0, l
    # stage 2's box reaches the layer-0 weights through the (non-detached) reference of stage 2
    layer0 = list(model.transformer.decoder.layers[0].cross_attn.value_proj.parameters())
    assert sum(g.abs().sum() for g in grads(out.main.references[2], layer0) if g is not None) > 0
    (g_anchor,) = grads(out.main.boxes[-1], [model.anchor_box_embed.weight])
    assert g_anchor.abs().sum() > 0


def test_overfits_one_image():
    """The training path can fit one image: after 150 steps both objects are the two top detections
    with their classes, IoU > 0.8, well above the rest (a broken gradient path fails this)."""
    from tprd.layers.box_ops import box_iou

    model = tiny_model(criterion=_criterion()).train()
    sample = _train_batch()[0]
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    totals = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is faster (about 3 s)
    try:
        for _ in range(150):
            loss = sum(model([sample]).values())
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)  # as the trainer (train.clip_grad)
            opt.step()
            totals.append(loss.item())
    finally:
        torch.set_num_threads(threads)
    assert totals[-1] < 0.15 * totals[0], (totals[0], totals[-1])
    model.eval()
    with torch.no_grad():
        det = model([{"image": sample["image"], "height": 96, "width": 128}])[0]
    iou = box_iou(sample["gt_boxes"], det["boxes"][:2])[0]
    best = iou.argmax(1)
    assert sorted(best.tolist()) == [0, 1]
    assert (iou.max(1).values > 0.8).all(), iou
    assert det["labels"][best].tolist() == sample["gt_classes"].tolist()
    assert det["scores"][1] > 0.5 > det["scores"][2], det["scores"][:4]
