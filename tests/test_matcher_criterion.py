"""Hungarian matcher and set criterion: brute force, hand-computed values, the training fixture."""
import itertools
import json
import math

import numpy as np
import pytest
import torch

from conftest import PARITY_DIR
from tprd.modeling.criterion import SetCriterion, get_num_boxes, loss_boxes, loss_labels
from tprd.modeling.matcher import HungarianMatcher

TRAIN_FIXTURE = PARITY_DIR / "deformable_detr_train"


# ---------------------------------------------------------------------------------------------
# independent reference implementations (float64, plain Python / numpy)
# ---------------------------------------------------------------------------------------------


def _xyxy(b):
    cx, cy, w, h = b
    return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2


def _giou(a, b):
    a, b = _xyxy(a), _xyxy(b)
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    # detrex's GIoU: both the union and the hull get 1e-6
    return inter / (union + 1e-6) - (hull - union) / (hull + 1e-6)


def _cost(logit, box, label, gbox):
    p = 1 / (1 + math.exp(-logit[label]))
    pos = 0.25 * (1 - p) ** 2 * -math.log(p + 1e-8)
    neg = 0.75 * p**2 * -math.log(1 - p + 1e-8)
    l1 = sum(abs(x - y) for x, y in zip(box, gbox))
    return 5 * l1 + 2 * (pos - neg) - 2 * _giou(box, gbox)


def _random_case(gen, q, g, c=3):
    logits = torch.randn(q, c, generator=gen, dtype=torch.float64).float()
    centres = torch.rand(q + g, 2, generator=gen) * 0.6 + 0.2
    sizes = torch.rand(q + g, 2, generator=gen) * 0.3 + 0.05
    boxes = torch.cat([centres, sizes], 1)
    labels = torch.randint(0, c, (g,), generator=gen)
    return logits, boxes[:q], {"labels": labels, "boxes": boxes[q:]}


@pytest.mark.parametrize("seed", range(6))
def test_matcher_finds_brute_force_optimum(seed):
    gen = torch.Generator().manual_seed(seed)
    q, g = 5, 3
    logits, boxes, target = _random_case(gen, q, g)
    matcher = HungarianMatcher()
    (src, tgt), = matcher(logits[None], boxes[None], [target])
    assert src.tolist() == sorted(src.tolist())  # sorted by query
    cost = [[_cost(logits[i].tolist(), boxes[i].tolist(), int(target["labels"][j]), target["boxes"][j].tolist())
             for j in range(g)] for i in range(q)]
    best = min(sum(cost[perm[j]][j] for j in range(g)) for perm in itertools.permutations(range(q), g))
    got = sum(cost[i][j] for i, j in zip(src.tolist(), tgt.tolist()))
    assert sorted(tgt.tolist()) == list(range(g))
    assert got == pytest.approx(best, abs=1e-5)
    # the batched cost matrix equals the hand formula
    c, sizes = matcher.cost_matrix(logits[None], boxes[None], [target])
    assert np.allclose(c[0].numpy(), np.array(cost), atol=1e-5)


def test_matcher_batch_with_empty_image_and_stages():
    gen = torch.Generator().manual_seed(7)
    l0, b0, t0 = _random_case(gen, 6, 2)
    l1, b1, _ = _random_case(gen, 6, 1)
    l2, b2, t2 = _random_case(gen, 6, 4)
    t1 = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    logits, boxes, targets = torch.stack([l0, l1, l2]), torch.stack([b0, b1, b2]), [t0, t1, t2]
    matcher = HungarianMatcher()
    out = matcher(logits, boxes, targets)
    assert out[1][0].numel() == 0 and out[1][1].numel() == 0 and out[1][0].dtype == torch.int64
    for (s, t), tg in zip(out, targets):
        assert len(s) == len(tg["labels"])
    # per image equals matching that image alone (padding does not leak)
    for i in (0, 2):
        alone = matcher(logits[i:i + 1], boxes[i:i + 1], [targets[i]])[0]
        assert torch.equal(alone[0], out[i][0]) and torch.equal(alone[1], out[i][1])
    # several stages at once equal stage by stage
    stages = torch.stack([logits, logits.flip(1)]), torch.stack([boxes, boxes.flip(1)])
    per_stage = matcher.match_stages(*stages, targets)
    for l in range(2):
        single = matcher(stages[0][l], stages[1][l], targets)
        for (a, b), (c, d) in zip(per_stage[l], single):
            assert torch.equal(a, c) and torch.equal(b, d)
    # all images empty
    empty = matcher(logits, boxes, [t1, t1, t1])
    assert all(s.numel() == 0 for s, _ in empty)


# ---------------------------------------------------------------------------------------------
# criterion terms, hand computed
# ---------------------------------------------------------------------------------------------


def _focal(z, t, alpha=0.25, gamma=2.0):
    p = 1 / (1 + math.exp(-z))
    ce = -(t * math.log(p) + (1 - t) * math.log(1 - p))
    p_t = p * t + (1 - p) * (1 - t)
    return (alpha * t + (1 - alpha) * (1 - t)) * ce * (1 - p_t) ** gamma


def test_loss_labels_hand_computed():
    logits = torch.tensor([[[0.5, -1.0], [2.0, 0.0], [-0.3, 1.5]]])  # B=1, Q=3, C=2
    targets = [{"labels": torch.tensor([1]), "boxes": torch.zeros(1, 4)}]
    indices = [(torch.tensor([2]), torch.tensor([0]))]  # query 2 <-> class 1
    onehot = [[0, 0], [0, 0], [0, 1]]
    per_q_c = [[_focal(logits[0, q, c].item(), onehot[q][c]) for c in range(2)] for q in range(3)]
    num_boxes = 2.0
    expected = sum(sum(per_q_c[q][c] for q in range(3)) / 3 for c in range(2)) / num_boxes * 3
    got = loss_labels(logits, targets, indices, num_boxes)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_loss_boxes_hand_computed():
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.1, 0.1, 0.1, 0.1]]])
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]
    indices = [(torch.tensor([0]), torch.tensor([0]))]
    out = loss_boxes(boxes, targets, indices, num_boxes=1.0)
    # L1 = 0.2 + 0.2; IoU = 0.04 / 0.16, hull = union -> GIoU = 0.25 - 0 (up to the 1e-6 hull eps)
    assert out["loss_bbox"].item() == pytest.approx(0.4, abs=1e-6)
    assert out["loss_giou"].item() == pytest.approx(0.75, abs=1e-5)
    # disjoint boxes: GIoU = -(hull - union)/hull
    boxes2 = torch.tensor([[[0.2, 0.2, 0.2, 0.2]]])
    tgt2 = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.7, 0.2, 0.2, 0.2]])}]
    out2 = loss_boxes(boxes2, tgt2, [(torch.tensor([0]), torch.tensor([0]))], num_boxes=2.0)
    hull, union = 0.7 * 0.2, 0.08
    assert out2["loss_giou"].item() == pytest.approx((1 + (hull - union) / hull) / 2, abs=1e-5)
    assert out2["loss_bbox"].item() == pytest.approx(0.5 / 2, abs=1e-6)


def test_staged_terms_equal_per_stage_terms_and_keep_graph_without_pairs():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 2, 4, 5, generator=gen, requires_grad=True)
    boxes = (torch.rand(3, 2, 4, 4, generator=gen) * 0.5 + 0.2).requires_grad_(True)
    targets = [{"labels": torch.tensor([1, 4]), "boxes": torch.rand(2, 4, generator=gen) * 0.3 + 0.3},
               {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]
    idx = [[(torch.tensor([0, 3]), torch.tensor([1, 0])), (torch.empty(0, dtype=torch.int64),) * 2],
           [(torch.tensor([1, 2]), torch.tensor([0, 1])), (torch.empty(0, dtype=torch.int64),) * 2],
           [(torch.empty(0, dtype=torch.int64),) * 2, (torch.empty(0, dtype=torch.int64),) * 2]]
    staged_cls = loss_labels(logits, targets, idx, 2.0)
    staged_box = loss_boxes(boxes, targets, idx, 2.0)
    for l in range(3):
        assert staged_cls[l].item() == pytest.approx(loss_labels(logits[l], targets, idx[l], 2.0).item(), rel=1e-6)
        single = loss_boxes(boxes[l], targets, idx[l], 2.0)
        assert staged_box["loss_bbox"][l].item() == pytest.approx(single["loss_bbox"].item(), abs=1e-7)
    assert staged_box["loss_bbox"][2].item() == 0.0
    (staged_box["loss_bbox"].sum() + staged_box["loss_giou"].sum() + staged_cls.sum()).backward()
    assert boxes.grad is not None and logits.grad is not None


def test_num_boxes_clamped():
    assert get_num_boxes([{"labels": torch.zeros(0, dtype=torch.int64)}]) == 1.0
    assert get_num_boxes([{"labels": torch.zeros(3)}, {"labels": torch.zeros(2)}]) == 5.0


def test_criterion_keys_order_weights_and_binary_enc():
    gen = torch.Generator().manual_seed(5)
    L, B, Q, C, S = 3, 2, 6, 4, 10
    from tprd.modeling.outputs import DetectorOutputs, StagePredictions

    outputs = DetectorOutputs(
        main=StagePredictions(torch.randn(L, B, Q, C, generator=gen), torch.rand(L, B, Q, 4, generator=gen) * 0.4 + 0.3),
        enc={"pred_logits": torch.randn(B, S, C, generator=gen), "pred_boxes": torch.rand(B, S, 4, generator=gen) * 0.4 + 0.3},
    )
    targets = [{"labels": torch.tensor([3, 1]), "boxes": torch.rand(2, 4, generator=gen) * 0.3 + 0.3},
               {"labels": torch.tensor([2]), "boxes": torch.rand(1, 4, generator=gen) * 0.3 + 0.3}]
    weights = {"loss_class": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}
    weights.update({k + s: v for k, v in list(weights.items()) for s in ("_0", "_1", "_enc")})
    crit = SetCriterion(C, HungarianMatcher(), weights, two_stage_binary_cls=True)
    losses, idx = crit(outputs, targets, return_indices=True)
    assert list(losses) == ["loss_class", "loss_bbox", "loss_giou", "loss_class_0", "loss_bbox_0", "loss_giou_0",
                            "loss_class_1", "loss_bbox_1", "loss_giou_1", "loss_class_enc", "loss_bbox_enc",
                            "loss_giou_enc"]
    weighted = crit.weight_losses(losses)
    assert weighted["loss_bbox_1"].item() == pytest.approx(5 * losses["loss_bbox_1"].item())
    # binary: the encoder proposals are matched and supervised as class 0
    binary = [{"labels": torch.zeros_like(t["labels"]), "boxes": t["boxes"]} for t in targets]
    enc_idx = HungarianMatcher()(outputs.enc["pred_logits"], outputs.enc["pred_boxes"], binary)
    assert losses["loss_class_enc"].item() == pytest.approx(
        loss_labels(outputs.enc["pred_logits"], binary, enc_idx, 3.0).item(), rel=1e-6)
    # final stage = last slice, "_0" = first
    final = loss_labels(outputs.main.logits[-1], targets, idx["stages"][-1], 3.0)
    assert losses["loss_class"].item() == pytest.approx(final.item(), rel=1e-6)
    # also accepts detrex-style dicts
    as_dict = {"pred_logits": outputs.main.logits[-1], "pred_boxes": outputs.main.boxes[-1],
               "aux_outputs": [{"pred_logits": outputs.main.logits[l], "pred_boxes": outputs.main.boxes[l]} for l in range(2)]}
    again = crit(as_dict, targets)
    assert again["loss_giou_0"].item() == pytest.approx(losses["loss_giou_0"].item(), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# the training fixture (detrex's matcher and criterion outputs on stored predictions)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def train_fixture():
    if not TRAIN_FIXTURE.is_dir():
        pytest.fail(f"training parity fixture not found at {TRAIN_FIXTURE} (set TPRD_REFERENCE_DIR)")
    out = torch.load(TRAIN_FIXTURE / "outputs.pt", weights_only=False)
    losses = json.loads((TRAIN_FIXTURE / "losses.json").read_text())
    return out, losses


def test_matcher_reproduces_fixture_costs_and_matches(train_fixture):
    out, _ = train_fixture
    logits, boxes, targets = out["all_layers_pred_logits"], out["all_layers_pred_boxes"], out["targets"]
    matcher = HungarianMatcher(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0)
    cost, sizes = matcher.cost_matrix(logits, boxes, targets)
    staged = matcher.match_stages(logits, boxes, targets)
    names = {"final": logits.shape[0] - 1, "aux_0": 0}
    for name, l in names.items():
        for b, ref in enumerate(out["match_cost_matrices"][name]):
            assert torch.allclose(cost[l, b, :, :sizes[b]], ref, atol=1e-4, rtol=1e-4)
        for b, (src, tgt) in enumerate(out["matches"][name]):
            assert torch.equal(staged[l][b][0], src) and torch.equal(staged[l][b][1], tgt)


def test_criterion_reproduces_fixture_losses(train_fixture):
    out, ref = train_fixture
    from tprd.modeling.outputs import StagePredictions

    crit = SetCriterion(5, HungarianMatcher(), ref["weight_dict"])
    losses = crit(StagePredictions(out["all_layers_pred_logits"], out["all_layers_pred_boxes"]), out["targets"])
    assert list(losses) == list(ref["losses_unweighted"])
    for k, v in ref["losses_unweighted"].items():
        assert losses[k].item() == pytest.approx(v, abs=1e-4, rel=1e-4), k
    weighted = crit.weight_losses(losses)
    for k, v in ref["losses"].items():
        assert weighted[k].item() == pytest.approx(v, abs=1e-4, rel=1e-4), k
