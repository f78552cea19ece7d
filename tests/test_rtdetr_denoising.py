"""RT-DETRv2's contrastive denoising against the reference's description (docs/rt_detr.md#parity).

The expected values are computed here, slot by slot, from the description of the reference's
``get_contrastive_denoising_training_group``: ``max_gt`` = the largest box count per image,
``num_group = max(num_denoising // max_gt, 1)``, ``N = 2 * max_gt * num_group`` slots (per group
``max_gt`` positive then ``max_gt`` negative slots; slots beyond an image's box count are padding with
class ``num_classes`` and a zero box), and four draws from torch's default generator, in this order:

1. ``torch.rand_like(class_ids, dtype=torch.float)`` ``[B,N]``: a real slot's label is replaced where
   it is ``< label_noise_ratio * 0.5``;
2. ``torch.randint_like(mask, 0, num_classes, dtype=torch.int32)`` ``[B,N]``: the replacement labels;
3. ``torch.randint_like(boxes, 0, 2)`` ``[B,N,4]``: the sign, ``* 2 - 1``;
4. ``torch.rand_like(boxes)`` ``[B,N,4]``: the magnitude (``+ 1`` in negative slots); the xyxy corners
   move by ``sign * magnitude * (w/2, h/2, w/2, h/2) * box_noise_scale``, are clipped to [0, 1] and go
   back to cxcywh through ``inverse_sigmoid`` (clamped at 1e-5).

Checked: the function on its own (uneven box counts, an image without boxes, a batch without any);
a full training step of a small RT-DETR (forward, criterion, backward) consumes exactly these four
draws and nothing else; the parity runner (``tools/detrex_parity.py``) seeds with the fixture's
``rng_seed`` right before the forward and reports the denoising part under the fixture's key names,
run on a fixture folder made here from our own small model (config.json, keys.json,
fill_checksums.json, input.pt: the only files it may read).
"""
import json
import math
import random

import numpy as np
import pytest
import torch

from tprd.modeling.rtdetr_decoder import contrastive_denoising_group

NUM_CLASSES = 4
# three images with 3, 1 and 0 boxes (normalised cxcywh): padding in images 1 and 2
TARGETS = [
    {"labels": torch.tensor([2, 0, 3]),
     "boxes": torch.tensor([[0.30, 0.40, 0.20, 0.30], [0.60, 0.55, 0.50, 0.40], [0.85, 0.10, 0.20, 0.15]])},
    {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.50, 0.50, 0.90, 0.80]])},
    {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)},
]


def _identity_embedding(num_classes, dim=3):
    """An embedding whose row ``c`` is ``c + 1`` everywhere: the content shows the class id."""
    emb = torch.nn.Embedding(num_classes + 1, dim, padding_idx=num_classes)
    with torch.no_grad():
        emb.weight.copy_(torch.arange(1, num_classes + 2, dtype=torch.float32)[:, None].expand(-1, dim))
    return emb


def _draws(bsz, n, label_noise=True, box_noise=True):
    """The four draws of the description, made with the calls it names (from the current state)."""
    out = {}
    if label_noise:
        class_ids = torch.zeros(bsz, n, dtype=torch.int32)
        out["flip"] = torch.rand_like(class_ids, dtype=torch.float)
        out["new"] = torch.randint_like(out["flip"] < 0, 0, NUM_CLASSES, dtype=torch.int32)
    if box_noise:
        boxes = torch.zeros(bsz, n, 4)
        out["sign"] = torch.randint_like(boxes, 0, 2)
        out["magnitude"] = torch.rand_like(boxes)
    return out


def _inverse_sigmoid(x):
    x = min(max(x, 0.0), 1.0)
    return math.log(max(x, 1e-5) / max(1.0 - x, 1e-5))


def expected_group(targets, num_queries, num_denoising, draws, label_noise_ratio=0.5, box_noise_scale=1.0):
    """The description, slot by slot, in float64: noisy class ids ``[B][N]``, un-sigmoided boxes
    ``[B][N][4]``, the attention mask ``[N+Q][N+Q]`` (True = blocked), the positive slots per image
    and ``(num_group, N)``."""
    counts = [len(t["labels"]) for t in targets]
    empty = max(counts) == 0
    max_gt = 1 if empty else max(counts)
    num_group = 1 if empty else max(num_denoising // max_gt, 1)
    n = 2 * max_gt * num_group
    classes, boxes, positives = [], [], []
    for b, t in enumerate(targets):
        row_c, row_b, pos = [], [], []
        for j in range(n):
            within = j % (2 * max_gt)
            negative = within >= max_gt
            k = within % max_gt  # the image's box this slot copies
            real = k < counts[b]
            if real and not negative:
                pos.append(j)
            if real:
                c = int(t["labels"][k])
                if "flip" in draws and float(draws["flip"][b, j]) < label_noise_ratio * 0.5:
                    c = int(draws["new"][b, j])
                cx, cy, w, h = (float(v) for v in t["boxes"][k])
            else:
                c = NUM_CLASSES
                cx, cy, w, h = (0.5, 0.5, 0.1, 0.1) if empty else (0.0, 0.0, 0.0, 0.0)
            corners = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
            half = [w / 2, h / 2, w / 2, h / 2]
            if "sign" in draws:
                for i in range(4):
                    sign = float(draws["sign"][b, j, i]) * 2 - 1
                    magnitude = float(draws["magnitude"][b, j, i]) + (1.0 if negative else 0.0)
                    corners[i] = min(max(corners[i] + sign * magnitude * half[i] * box_noise_scale, 0.0), 1.0)
            x1, y1, x2, y2 = corners
            row_c.append(c)
            row_b.append([_inverse_sigmoid(v) for v in ((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1)])
        classes.append(row_c)
        boxes.append(row_b)
        positives.append(pos)
    size = n + num_queries
    mask = [[(i >= n and j < n) or (i < n and j < n and i // (2 * max_gt) != j // (2 * max_gt))
             for j in range(size)] for i in range(size)]
    return {"classes": classes, "boxes": boxes, "mask": mask, "positives": positives, "num_group": num_group, "n": n}


def _assert_group_matches(content, ref_unact, mask, meta, exp, classes=None):
    assert meta["dn_num_group"] == exp["num_group"]
    assert meta["dn_num_split"] == [exp["n"], len(exp["mask"]) - exp["n"]]
    assert [p.tolist() for p in meta["dn_positive_idx"]] == exp["positives"]
    assert torch.equal(mask, torch.tensor(exp["mask"]))
    if content is not None:  # the identity embedding: class id + 1 in every channel
        assert torch.equal(content[..., 0], torch.tensor(exp["classes"], dtype=torch.float32) + 1)
    if classes is not None:
        assert classes.dtype == torch.int32 and classes.tolist() == exp["classes"]
    torch.testing.assert_close(ref_unact.double(), torch.tensor(exp["boxes"], dtype=torch.float64),
                               atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("num_denoising", [10, 2])  # 3 groups of 3 + 3 slots; 2 // 3 = 0 -> 1 group
def test_group_follows_the_description(num_denoising):
    emb = _identity_embedding(NUM_CLASSES)
    max_gt = 3
    n = 2 * max_gt * max(num_denoising // max_gt, 1)
    torch.manual_seed(123)
    content, ref_unact, mask, meta, classes = contrastive_denoising_group(
        TARGETS, NUM_CLASSES, 5, emb, num_denoising=num_denoising, return_class=True)
    after = torch.get_rng_state()
    torch.manual_seed(123)
    draws = _draws(len(TARGETS), n)
    # the function drew exactly the four draws (nothing more, nothing else in between)
    assert torch.equal(after, torch.get_rng_state())
    exp = expected_group(TARGETS, 5, num_denoising, draws)
    assert exp["n"] == n
    _assert_group_matches(content, ref_unact, mask, meta, exp, classes)
    # the case is not degenerate: some labels flipped, and every real slot's box moved
    real = torch.tensor(exp["classes"]) != NUM_CLASSES
    assert (draws["flip"][real] < 0.25).any() and (draws["flip"][real] >= 0.25).any()
    # four-argument call: the same values without the class ids
    torch.manual_seed(123)
    four = contrastive_denoising_group(TARGETS, NUM_CLASSES, 5, emb, num_denoising=num_denoising)
    assert len(four) == 4 and torch.equal(four[1], ref_unact) and torch.equal(four[2], mask)


def test_noise_switched_off_draws_nothing():
    emb = _identity_embedding(NUM_CLASSES)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    content, ref_unact, mask, meta = contrastive_denoising_group(
        TARGETS, NUM_CLASSES, 5, emb, num_denoising=6, label_noise_ratio=0.0, box_noise_scale=0.0)
    assert torch.equal(before, torch.get_rng_state())
    _assert_group_matches(content, ref_unact, mask, meta, expected_group(TARGETS, 5, 6, {}))
    # only the label draws
    torch.manual_seed(5)
    out = contrastive_denoising_group(TARGETS, NUM_CLASSES, 5, emb, num_denoising=6, box_noise_scale=0.0)
    torch.manual_seed(5)
    draws = _draws(3, 12, box_noise=False)
    _assert_group_matches(*out, expected_group(TARGETS, 5, 6, draws))


def test_batch_without_boxes_keeps_one_dummy_slot_and_draws():
    """The reference at the pinned commit keeps one dummy slot (centre box 0.5/0.1, padding class,
    never positive) for a batch without any box, so that DDP sees the same graph on every rank; it
    still makes the four draws (shapes [B,2] / [B,2,4])."""
    emb = _identity_embedding(NUM_CLASSES)
    targets = [TARGETS[2], TARGETS[2]]
    torch.manual_seed(9)
    out = contrastive_denoising_group(targets, NUM_CLASSES, 3, emb, num_denoising=8)
    after = torch.get_rng_state()
    torch.manual_seed(9)
    draws = _draws(2, 2)
    assert torch.equal(after, torch.get_rng_state())
    exp = expected_group(targets, 3, 8, draws)
    assert exp["n"] == 2 and exp["positives"] == [[], []]
    _assert_group_matches(*out, exp)


# ------------------------------------------------------------------------------------------------
# a training step consumes exactly the four draws
# ------------------------------------------------------------------------------------------------
REDUCED_CONFIG = {
    "PResNet": {"depth": 18, "variant": "d", "freeze_at": -1, "return_idx": [1, 2, 3], "num_stages": 4,
                "freeze_norm": False, "pretrained": False, "act": "relu"},
    "HybridEncoder": {"in_channels": [128, 256, 512], "feat_strides": [8, 16, 32], "hidden_dim": 32,
                      "use_encoder_idx": [2], "num_encoder_layers": 1, "nhead": 4, "dim_feedforward": 64,
                      "dropout": 0.0, "enc_act": "gelu", "expansion": 0.5, "depth_mult": 1, "act": "silu",
                      "pe_temperature": 10000, "eval_spatial_size": [64, 96], "version": "v2"},
    "RTDETRTransformerv2": {"feat_channels": [32, 32, 32], "feat_strides": [8, 16, 32], "hidden_dim": 32,
                            "num_levels": 3, "num_layers": 2, "num_queries": 8, "num_denoising": 7,
                            "label_noise_ratio": 0.5, "box_noise_scale": 1.0, "eval_idx": -1,
                            "num_points": [4, 4, 4], "cross_attn_method": "default",
                            "query_select_method": "default", "num_classes": NUM_CLASSES, "nhead": 4,
                            "dim_feedforward": 64, "dropout": 0.0, "activation": "relu",
                            "learn_query_content": False, "eval_spatial_size": [64, 96], "eps": 0.01,
                            "aux_loss": True},
    "HungarianMatcher": {"weight_dict": {"cost_class": 2, "cost_bbox": 5, "cost_giou": 2},
                         "use_focal_loss": True, "alpha": 0.25, "gamma": 2.0},
    "RTDETRCriterionv2": {"weight_dict": {"loss_vfl": 1, "loss_bbox": 5, "loss_giou": 2}, "losses": ["vfl", "boxes"],
                          "alpha": 0.75, "gamma": 2.0, "num_classes": NUM_CLASSES, "boxes_weight_format": None,
                          "share_matched_indices": False},
    "RTDETRPostProcessor": {"num_top_queries": 8, "num_classes": NUM_CLASSES, "use_focal_loss": True,
                            "remap_mscoco_category": False},
}
TRAIN_TARGETS = TARGETS[:2]  # 3 and 1 boxes: max_gt 3, 7 // 3 = 2 groups, N = 12


def _images(seed=3):
    return torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(seed))


def test_training_step_draws_only_the_four_draws():
    from tprd.modeling.rt_detr import build_rtdetr_from_reference_config

    torch.manual_seed(0)
    model = build_rtdetr_from_reference_config(REDUCED_CONFIG).train()
    images = model.images_from_tensor(_images())
    py_state, np_state = random.getstate(), np.random.get_state()
    torch.manual_seed(77)
    outputs = model.forward_outputs(images, targets=TRAIN_TARGETS)
    losses = model.criterion.weight_losses(model.criterion(outputs, TRAIN_TARGETS))
    sum(losses.values()).backward()
    after = torch.get_rng_state()
    assert random.getstate() == py_state
    np_after = np.random.get_state()
    assert np_after[0] == np_state[0] and np.array_equal(np_after[1], np_state[1]) and np_after[2:] == np_state[2:]

    torch.manual_seed(77)
    draws = _draws(2, 12)
    assert torch.equal(after, torch.get_rng_state()), "the training step drew more (or less) than the four draws"
    # and they were the first draws after the seed: the denoising inputs follow from them
    exp = expected_group(TRAIN_TARGETS, 8, 7, draws)
    dn = outputs.dn
    _assert_group_matches(None, dn["reference_unact"], dn["attn_mask"], dn["dn_meta"], exp, dn["query_class"])
    assert any(k.endswith("_dn_1") for k in losses)
    assert model.decoder.denoising_class_embed.weight.grad is not None


# ------------------------------------------------------------------------------------------------
# the parity runner on a training fixture with denoising
# ------------------------------------------------------------------------------------------------
RNG_SEED = 31


def _write_fixture(folder):
    """A training fixture in the layout of tests/fixtures/reference/rtdetr_parity/*_train/ (only the
    four input files), for our small model with ``num_denoising=7``."""
    from tprd.modeling.rt_detr import build_rtdetr_from_reference_config
    from tprd.testing.rtdetr_parity import fill_rtdetr_state_dict

    folder.mkdir()
    unit_std = ["tgt_embed.weight", "denoising_class_embed.weight"]
    config = {"fixture": folder.name, "arch": "rtdetrv2", "mode": "train", "reduced_config": REDUCED_CONFIG,
              "unit_std_suffixes": unit_std, "train": {"rng_seed": RNG_SEED, "num_denoising": 7}}
    model = build_rtdetr_from_reference_config(REDUCED_CONFIG)
    state = model.state_dict()
    keys = [[k, list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in state.items()]
    # checksums of the fill itself (the fill is checked against the reference's in test_rtdetr_parity.py)
    fill = fill_rtdetr_state_dict(model, keys, unit_std_suffixes=unit_std)
    sums = {k: [v.double().sum().item(), v.double().abs().sum().item(), v.flatten()[0].item()] for k, v in fill.items()}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "keys.json").write_text(json.dumps(keys))
    (folder / "fill_checksums.json").write_text(json.dumps(sums))
    torch.save({"images": _images(), "targets": TRAIN_TARGETS}, folder / "input.pt")
    return folder


def test_parity_runner_seeds_before_the_forward_and_dumps_the_denoising_part(tmp_path):
    import importlib.util

    from conftest import REPO

    fixture = _write_fixture(tmp_path / "rtdetr_dn_train")
    spec = importlib.util.spec_from_file_location("detrex_parity", REPO / "tools" / "detrex_parity.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    results = []  # the tool's result object, for our side of intermediates.pt

    def run_and_keep(path):
        results.append(run(path))
        return results[-1]

    run, tool.run_rtdetr_fixture = tool.run_rtdetr_fixture, run_and_keep
    torch.manual_seed(1)
    torch.rand(17)  # whatever state the caller leaves must not matter
    out = tmp_path / "ours.pt"
    assert tool.main([str(fixture), "--dump", str(out)]) == 0
    after = torch.get_rng_state()
    dump = torch.load(out, weights_only=False)

    torch.manual_seed(RNG_SEED)
    draws = _draws(2, 12)
    assert torch.equal(after, torch.get_rng_state()), "the runner drew more than the four denoising draws"
    exp = expected_group(TRAIN_TARGETS, 8, 7, draws)
    meta = dump["dn_meta"]
    assert set(meta) == {"dn_positive_idx", "dn_num_group", "dn_num_split"}
    assert [p.tolist() for p in meta["dn_positive_idx"]] == exp["positives"] == [[0, 1, 2, 6, 7, 8], [0, 6]]
    assert meta["dn_num_group"] == 2 and meta["dn_num_split"] == [12, 8]
    assert [(p.tolist(), g.tolist()) for p, g in dump["dn_matches"]] == [([0, 1, 2, 6, 7, 8], [0, 1, 2, 0, 1, 2]),
                                                                        ([0, 6], [0, 0])]
    assert dump["dn_num_boxes"] == 4 * 2
    # the dn L1 loss: fixed pairs (positive slot of every group <-> its box), over num_boxes * num_group
    for i, stage in enumerate(dump["dn_aux_outputs"]):
        l1 = sum(float((stage["pred_boxes"][b, j] - TRAIN_TARGETS[b]["boxes"][j % 6]).abs().sum())
                 for b, slots in enumerate(exp["positives"]) for j in slots)
        assert float(dump["losses_unweighted"][f"loss_bbox_dn_{i}"]) == pytest.approx(l1 / 8, rel=1e-5)
    assert len(dump["dn_aux_outputs"]) == 2
    for stage in dump["dn_aux_outputs"]:
        assert stage["pred_logits"].shape == (2, 12, NUM_CLASSES) and stage["pred_boxes"].shape == (2, 12, 4)
    base = ["loss_vfl", "loss_bbox", "loss_giou"]
    assert list(dump["losses"]) == base + [k + "_aux_0" for k in base] + \
        [k + f"_dn_{i}" for i in range(2) for k in base] + [k + "_enc_0" for k in base]
    # the dn queries the decoder started from are those of the seeded draws
    (result,) = results
    assert result.ok, result.report()
    inter = result.intermediates
    assert inter["dn_input_query_class"].tolist() == exp["classes"]
    assert torch.equal(inter["dn_attn_mask"], torch.tensor(exp["mask"]))
    torch.testing.assert_close(inter["dn_input_query_bbox_unact"].double(),
                               torch.tensor(exp["boxes"], dtype=torch.float64), atol=2e-5, rtol=1e-5)
    assert inter["dn_input_query_logits"].shape == (2, 12, 32)


def test_comparison_checks_the_denoising_part():
    """``compare_rtdetr_fixture``'s denoising checks: equal parts pass, a changed positive slot, a
    changed dn prediction, a wrong normaliser or a missing key fail."""
    from tprd.testing.rtdetr_parity import TOLERANCES, _compare_dn

    pos = (torch.tensor([0, 1, 4]), torch.tensor([0, 4]))
    ref = {"dn_meta": {"dn_positive_idx": pos, "dn_num_group": 2, "dn_num_split": [8, 5]},
           "dn_matches": [(pos[0], torch.tensor([0, 1, 0])), (pos[1], torch.tensor([0, 0]))],
           "dn_num_boxes": 6.0,
           "dn_aux_outputs": [{"pred_logits": torch.ones(2, 8, 3), "pred_boxes": torch.full((2, 8, 4), 0.5)}]}
    tol = TOLERANCES["train"]

    def ok(dump):
        return all(c.ok for c in _compare_dn(dump, ref, tol))

    same = {k: v for k, v in ref.items()}
    assert ok(same)
    assert not ok(same | {"dn_num_boxes": 3.0})
    assert not ok(same | {"dn_meta": {**ref["dn_meta"], "dn_positive_idx": (torch.tensor([0, 1, 5]), pos[1])}})
    assert not ok(same | {"dn_meta": {**ref["dn_meta"], "dn_num_group": 1}})
    assert not ok(same | {"dn_aux_outputs": [{"pred_logits": torch.ones(2, 8, 3) + 1e-2,
                                              "pred_boxes": torch.full((2, 8, 4), 0.5)}]})
    assert not ok(same | {"dn_aux_outputs": []})
    assert not ok({k: v for k, v in ref.items() if k != "dn_matches"})
    assert _compare_dn({}, {"losses": {}}, tol) == []  # no denoising in the fixture: nothing to check
