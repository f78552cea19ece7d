"""QSKD: selection and pairing on a hand-built case, the attention-guided mask and memory term by
hand, the weighted splat against the per-query maps, stage/layer pairing, empty batches, and the
synthetic configs through the training entry point."""
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch

from tprd.distill import Distiller, QSKD
from tprd.distill.attention import cross_attention_maps
from tprd.distill.methods.qskd import (
    giou_query_selection,
    pair_selected_queries,
    selection_stage_of_layer,
    weighted_query_attention,
)
from tprd.modeling.outputs import DetectorOutputs, StagePredictions

from test_crosskd import datasets, synthetic_configs, train_through_entry_point, REPO  # noqa: F401
from test_distiller import batch, run_with_stats, tiny_dab, tiny_deformable, tiny_dino

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _giou(a, b):
    """GIoU of two cxcywh boxes, by the textbook formula (with detrex's 1e-6 on union and hull)."""
    ax0, ay0, ax1, ay1 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx0, by0, bx1, by1 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = a[2] * a[3] + b[2] * b[3] - inter
    hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
    return inter / (union + 1e-6) - (hull - union) / (hull + 1e-6)


# image 0: two GTs; image 1: no GT
G0, G1 = (0.25, 0.25, 0.2, 0.2), (0.75, 0.75, 0.2, 0.2)
NEAR_G0, NEAR_G1, FAR = (0.3, 0.3, 0.2, 0.2), (0.8, 0.8, 0.2, 0.2), (0.5, 0.1, 0.1, 0.1)
TARGETS = [
    {"labels": torch.tensor([0, 1]), "boxes": torch.tensor([G0, G1])},
    {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)},
]
# teacher: q0 <-> G1, q1 <-> G0, q2 hard negative near G0, q3 far (GIoU < 0), q4 hard negative near G1
T_BOXES = torch.tensor([[[G1, G0, NEAR_G0, FAR, NEAR_G1], [G0, G1, NEAR_G0, NEAR_G1, FAR]]])  # [1,2,5,4]
T_MATCHES = [[(torch.tensor([0, 1]), torch.tensor([1, 0])), (torch.zeros(0, dtype=torch.long),) * 2]]
# student: s0 <-> G0, s1 <-> G1, s2 hard negative (the box of teacher q4), s3 far
S_BOXES = torch.tensor([[[G0, G1, NEAR_G1, FAR], [G0, G1, NEAR_G0, FAR]]])  # [1,2,4,4]
S_MATCHES = [[(torch.tensor([0, 1]), torch.tensor([0, 1])), (torch.zeros(0, dtype=torch.long),) * 2]]


def test_hand_built_case_has_the_right_giou_values():
    assert _giou(NEAR_G0, G0) > 0 and _giou(NEAR_G1, G1) > 0
    assert max(_giou(FAR, G0), _giou(FAR, G1)) < 0


def test_selection_positives_hard_negatives_and_scores_by_hand():
    sel = giou_query_selection(T_BOXES, T_MATCHES, TARGETS)
    assert sel["positive"].tolist() == [[[True, True, False, False, False], [False] * 5]]
    # the hard negative with GIoU > 0 is selected, the one with GIoU < 0 is not; the empty image has none
    assert sel["hard_negative"].tolist() == [[[False, False, True, False, True], [False] * 5]]
    assert sel["match_index"].tolist() == [[[1, 0, -1, -1, -1], [-1] * 5]]
    expected = [_giou(G1, G1), _giou(G0, G0), _giou(NEAR_G0, G0), 0.0, _giou(NEAR_G1, G1)]
    torch.testing.assert_close(sel["score"][0, 0], torch.tensor(expected), atol=1e-4, rtol=0)
    assert sel["score"][0, 1].abs().sum() == 0
    # the threshold is strict: at the hard negatives' own (equal) GIoU they drop out
    own = float(sel["score"][0, 0, [2, 4]].max())
    assert not bool(giou_query_selection(T_BOXES, T_MATCHES, TARGETS, threshold=own)["hard_negative"].any())
    assert int(giou_query_selection(T_BOXES, T_MATCHES, TARGETS, threshold=own - 1e-4)["hard_negative"].sum()) == 2


def test_pairs_positive_by_shared_gt_and_hard_negatives_by_soft_matching():
    s_sel = giou_query_selection(S_BOXES, S_MATCHES, TARGETS)
    t_sel = giou_query_selection(T_BOXES, T_MATCHES, TARGETS)
    student = StagePredictions(torch.zeros(1, 2, 4, 3), S_BOXES)
    teacher = StagePredictions(torch.zeros(1, 2, 5, 3), T_BOXES)
    pairs = pair_selected_queries(student, teacher, s_sel, t_sel)
    got = list(zip(pairs["image"].tolist(), pairs["student"].tolist(), pairs["teacher"].tolist(), pairs["positive"].tolist()))
    # G0: s0 <-> t1, G1: s1 <-> t0 (positives first); the student's only hard negative s2 takes the
    # teacher hard negative with its own box (q4), not q2; the empty image contributes nothing
    assert got == [(0, 0, 1, True), (0, 1, 0, True), (0, 2, 4, False)]
    assert pairs["stage"].tolist() == [0, 0, 0]


def test_memory_mask_and_feature_term_by_hand():
    # one layer, one image, dense attention over S = 3 tokens, 2 heads, 2 teacher queries
    attn = torch.tensor([[[[0.2, 0.3, 0.5], [0.5, 0.5, 0.0]], [[0.1, 0.1, 0.8], [0.0, 1.0, 0.0]]]])  # [B,M,Q,S]
    taps = {"decoder_cross_attn": [{"kind": "dense", "attention_weights": attn}], "group_slices": {"main": slice(0, 2)},
            "memory": torch.zeros(1, 3, 2)}
    ctx = SimpleNamespace(section=lambda name: nullcontext(), teacher_out=DetectorOutputs(main=None, taps=taps),
                          student_out=DetectorOutputs(main=None, taps={"memory": torch.ones(1, 3, 2)}), teacher_stages=None)
    t_sel = {"positive": torch.tensor([[[True, False]]]), "hard_negative": torch.tensor([[[False, True]]]),
             "score": torch.tensor([[[0.5, 0.2]]])}
    method = QSKD()
    mask = method.memory_masks(ctx, t_sel)
    # M = mean((1 + 0.5)·[0.3, 0.4, 1.3], (1 + 0.2)·[0.5, 1.5, 0]) = [0.525, 1.2, 0.975] -> / 1.2
    torch.testing.assert_close(mask, torch.tensor([[[0.4375, 1.0, 0.8125]]]))
    term = method._feature(ctx, t_sel)
    torch.testing.assert_close(term, torch.tensor([(0.4375**2 + 1 + 0.8125**2) * 2 / 6]))
    # nothing selected: mask 0 (the 0.01 floor of the normaliser), term 0
    none = {k: torch.zeros_like(v) for k, v in t_sel.items()}
    assert method.memory_masks(ctx, none).abs().sum() == 0


@pytest.mark.parametrize("family", ["deformable", "dab"])
def test_weighted_splat_equals_weighted_sum_of_per_query_maps(family):
    make = {"deformable": tiny_deformable, "dab": tiny_dab}[family]
    model = make(seed=3).eval()
    with torch.no_grad():
        out = model.forward_outputs(model.preprocess(batch(num_classes=3)), return_attention=True)
        per_query = cross_attention_maps(out, "query")  # [L,B,Q,S]
        w = torch.rand(per_query.shape[1:3], generator=torch.Generator().manual_seed(0))
        for l, tap in enumerate(out.taps["decoder_cross_attn"]):
            expected = torch.einsum("bqs,bq->bs", per_query[l], w)
            torch.testing.assert_close(weighted_query_attention(tap, w), expected, atol=1e-5, rtol=1e-5)


def test_stage_of_layer_clean_and_reference_order():
    assert selection_stage_of_layer(6).tolist() == [0, 1, 2, 3, 4, 5]
    # the reference zips [final, stage 1..5] with [layer 1..6]
    assert selection_stage_of_layer(6, reference_stage_order=True).tolist() == [5, 0, 1, 2, 3, 4]


@pytest.mark.parametrize("family", ["deformable", "dab", "dino"])
def test_qskd_trains_on_three_families_and_an_empty_batch_keeps_the_graph(family):
    make = {"deformable": tiny_deformable, "dab": tiny_dab, "dino": tiny_dino}[family]
    for refine in (False, True):
        method = QSKD(refine=refine)
        distiller = Distiller(make(seed=1), make(seed=2), [method]).train()
        losses, stats = run_with_stats(distiller, batch(num_classes=3))
        keys = [k for k in losses if k.startswith("distill_qskd_")]
        assert {f"distill_qskd_{t}{s}" for t in method.terms for s in ("", "_0")} <= set(keys)
        assert all(torch.isfinite(losses[k]) for k in keys)
        assert float(losses["distill_qskd_class"]) > 0 and float(losses["distill_qskd_feature"]) > 0
        assert (not refine) or any(k.startswith("tprd_qskd_") for k in stats)
    # a batch without any GT: no pairs and no selected queries -> zeros that keep the graph (docs/methods.md#diff-9)
    empty = batch(num_classes=3)
    for x in empty:
        x["gt_boxes"], x["gt_classes"] = x["gt_boxes"][:0], x["gt_classes"][:0]
    losses = distiller(empty)
    qskd = [v for k, v in losses.items() if k.startswith("distill_qskd_")]
    assert all(float(v) == 0.0 and v.requires_grad for v in qskd)
    sum(qskd).backward()


@pytest.mark.parametrize("path", synthetic_configs("QSKD") + synthetic_configs("QSKD_TPRD"),
                         ids=lambda p: p.relative_to(REPO).as_posix())
def test_qskd_synthetic_configs_train_through_the_entry_point(path, datasets, tmp_path, monkeypatch):  # noqa: F811
    terms = train_through_entry_point(path, datasets, tmp_path / "run", monkeypatch, "qskd")
    assert {f"distill_qskd_{t}" for t in ("class", "l1", "giou", "feature")} <= set(terms)
