"""DETRDistill and KD-DETR plug-ins: hand-checked target-aware mask, zero losses for identical
models, prior assignment = the teacher's own GT loss, general points, query-count freedom, and the
DAB-DETR / DINO families."""
import copy
import math

import pytest
import torch

from tprd.distill import DETRDistill, Distiller, KDDETR
from tprd.distill.methods.base import query_group_from_tap
from tprd.distill.methods.detrdistill import target_aware_loss, target_aware_masks, target_aware_weights
from tprd.modeling.matcher import HungarianMatcher
from tprd.modeling.outputs import QueryGroup

from test_distiller import batch, run_with_stats, tiny_dab, tiny_deformable, tiny_dino

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest single-threaded, and the CI machine is shared (restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _sig(x):
    return 1.0 / (1.0 + math.exp(-x))


# ------------------------------------------------------------------------------------------------
# DETRDistill target-aware term, by hand
# ------------------------------------------------------------------------------------------------
def test_target_aware_mask_and_loss_by_hand():
    # one stage, one image, two queries, two classes, width 2
    logits = torch.tensor([[[[2.0, -10.0], [-10.0, 0.0]]]])
    boxes = torch.tensor([[[[0.5, 0.5, 0.5, 0.5], [0.75, 0.5, 0.5, 0.5]]]])  # IoU with GT: 1 and 1/3
    hidden = torch.tensor([[[[3.0, 4.0], [0.0, 2.0]]]])
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]])}]
    direction, weight = target_aware_weights(logits, boxes, hidden, targets, topk=2)
    w0, w1 = _sig(2.0) * 1.0, _sig(0.0) / 3.0
    assert torch.allclose(weight, torch.tensor([[[w0, w1]]]), atol=1e-6)
    d = [w0 * 0.6 + w1 * 0.0, w0 * 0.8 + w1 * 1.0]
    assert torch.allclose(direction, torch.tensor([[d]]), atol=1e-6)

    # teacher map 1x3 with feature vectors (1,0), (0,-1), (3,4); student map all zeros
    ft = torch.tensor([[[[1.0, 0.0, 3.0]], [[0.0, -1.0, 4.0]]]])
    raw = [d[0], max(-d[1], 0.01), 0.6 * d[0] + 0.8 * d[1]]
    mask = [r / max(raw) for r in raw]
    got = target_aware_masks(direction, ft)
    assert torch.allclose(got, torch.tensor([[[mask]]]), atol=1e-6)
    fs = torch.zeros_like(ft, requires_grad=True)
    loss = target_aware_loss(direction, [ft], [fs])
    norms2 = [1.0, 1.0, 25.0]
    want = sum(m * m * n for m, n in zip(mask, norms2)) / 6.0  # mean over B*D*H*W = 6
    assert loss.shape == (1,) and abs(float(loss.detach()) - want) < 1e-6
    loss.sum().backward()
    assert fs.grad is not None and fs.grad.abs().sum() > 0

    # an image without GT weighs entries by their score alone; top-k may repeat a query
    direction, weight = target_aware_weights(logits, boxes, hidden, [{"labels": torch.zeros(0), "boxes": torch.zeros(0, 4)}], topk=3)
    assert torch.allclose(weight, torch.tensor([[[_sig(2.0), _sig(0.0), _sig(-10.0)]]]), atol=1e-6)


# ------------------------------------------------------------------------------------------------
# identical student and teacher
# ------------------------------------------------------------------------------------------------
def _same_pair(make=tiny_deformable, **kw):
    teacher = make(seed=2, **kw)
    return copy.deepcopy(teacher), teacher


@pytest.mark.parametrize("make", [tiny_deformable, tiny_dab, tiny_dino])
def test_kd_detr_b5_is_zero_when_student_equals_teacher(make):
    student, teacher = _same_pair(make)
    distiller = Distiller(student, teacher, [KDDETR(general_points=5)]).train()
    losses = distiller(batch())
    distill = {k: v for k, v in losses.items() if k.startswith("distill_kd_detr")}
    assert len(distill) == 12
    for k, v in distill.items():
        # GIoU of a box with itself is area / (area + 1e-6) (detrex's epsilon): small, not 0, for tiny boxes
        assert abs(float(v)) < (1e-3 if "giou" in k else 1e-5), (k, float(v))


def test_kd_detr_tprd_is_zero_for_identical_one_stage_models():
    """Stage-1 refinement is the identity and TPRD-CKD(s, s) = 0 (docs/methods.md#inv-1, #inv-3)."""
    student, teacher = _same_pair(layers=1)
    distiller = Distiller(student, teacher, [KDDETR(general_points=5, refine=True)]).train()
    losses, stats = run_with_stats(distiller, batch(empty_last=True))
    for k in ("specific_class", "specific_l1", "specific_giou", "general_class"):
        # GIoU of a box with itself is area / (area + 1e-6) (detrex's epsilon): small, not 0, for tiny boxes
        assert abs(float(losses[f"distill_kd_detr_{k}"])) < (1e-3 if "giou" in k else 1e-5), k
    assert float(stats["tprd_kd_detr_specific_positive_refined_frac"]) == 0.0


def test_detrdistill_identical_models_by_hand_and_prior_assignment_is_teachers_gt_loss():
    student, teacher = _same_pair(layers=2)
    method = DETRDistill(topk=5)
    distiller = Distiller(student, teacher, [method]).train()
    data = batch()
    losses = distiller(data)
    # the soft matcher pairs each query with itself: box terms vanish, the class term is the
    # soft-label BCE floor = binary entropy of the teacher's probabilities, / (B*N)
    with torch.no_grad():
        t_out = teacher.forward_outputs(teacher.preprocess(data))
    p = t_out.main.logits.sigmoid().double()
    entropy = -(p * p.log() + (1 - p) * (1 - p).log()).sum((1, 2, 3)) / (2 * 6)
    for l, suffix in ((1, ""), (0, "_0")):
        assert abs(float(losses[f"distill_detrdistill_l1{suffix}"])) < 1e-5
        # GIoU of a box with itself is area / (area + 1e-6) (detrex's epsilon): small, not 0, for tiny boxes
        assert abs(float(losses[f"distill_detrdistill_giou{suffix}"])) < 1e-3
        assert abs(float(losses[f"distill_detrdistill_class{suffix}"]) - float(entropy[l])) < 1e-4  # weight 1
    # the student's decoding of the teacher's queries = the teacher's predictions, assigned with the
    # teacher's own matching: exactly the teacher's GT loss
    gt = teacher.criterion(t_out, teacher.prepare_targets(data))
    for term, key in (("prior_class", "loss_class"), ("prior_l1", "loss_bbox"), ("prior_giou", "loss_giou")):
        for suffix in ("", "_0"):
            want = method.weights[term] * gt[key + suffix]  # returned losses are weighted (5 for L1, 2 for GIoU)
            assert torch.allclose(losses[f"distill_detrdistill_{term}{suffix}"], want, atol=1e-5), term


def test_teacher_gt_matching_is_computed_once_and_shared():
    calls = []

    class Counting(HungarianMatcher):
        def match_stages(self, *a, **k):
            calls.append(1)
            return super().match_stages(*a, **k)

    student, teacher = tiny_deformable(seed=1), tiny_deformable(seed=2)
    methods = [DETRDistill(topk=5, refine=True, matcher=Counting()), KDDETR(general_points=3, refine=True, matcher=Counting())]
    Distiller(student, teacher, methods).train()(batch())
    assert len(calls) == 1  # DETRDistill's TPRD + prior assignment and KD-DETR's TPRD share M_l


# ------------------------------------------------------------------------------------------------
# KD-DETR general and specific points
# ------------------------------------------------------------------------------------------------
def test_general_points_seeded_fresh_and_without_graph():
    student, teacher = tiny_deformable(seed=1), tiny_deformable(seed=2)
    a, b = KDDETR(general_points=4, seed=7), KDDETR(general_points=4, seed=7)
    Distiller(student, teacher, [a]), Distiller(student, teacher, [b])
    p1, p2 = a.sample_general_points(torch.device("cpu")), a.sample_general_points(torch.device("cpu"))
    q1 = b.sample_general_points(torch.device("cpu"))
    assert torch.equal(p1.position, q1.position) and torch.equal(p1.content, q1.content)  # same seed, same stream
    assert not torch.equal(p1.position, p2.position)  # a fresh table every iteration
    assert p1.reference is None and p1.position.shape == (4, 32) and p1.content.shape == (4, 32)
    assert not p1.position.requires_grad and p1.position.grad_fn is None


def test_general_points_use_each_models_own_reference_layer_or_the_teachers():
    student, teacher = tiny_deformable(seed=1), tiny_deformable(seed=2)
    data = batch()
    for shared in (False, True):
        method = KDDETR(general_points=4, shared_general_refs=shared)
        distiller = Distiller(student, teacher, [method]).train()
        seen = {}
        orig = method.losses

        def spy(ctx):
            seen["ctx"] = ctx
            return orig(ctx)

        method.losses = spy
        distiller(data)
        ctx = seen["ctx"]
        name = "kd_detr/general"
        s_ref, t_ref = ctx.student_out.groups[name].references[0], ctx.teacher_out.groups[name].references[0]
        pos = method._general.position
        with torch.no_grad():
            own_t = teacher.transformer.reference_points(pos).sigmoid()
            own_s = student.transformer.reference_points(pos).sigmoid()
        assert torch.allclose(t_ref[0], own_t, atol=1e-6)
        assert torch.allclose(s_ref[0], own_t if shared else own_s, atol=1e-6)
        # specific points: the teacher's own queries and references
        spec = ctx.student_out.groups["kd_detr/specific"]
        assert spec.logits.shape[2] == teacher.num_queries
        assert torch.allclose(spec.references[0], ctx.teacher_out.main.references[0])


def test_general_point_kinds_for_dab_and_dino():
    dab_s, dab_t = tiny_dab(seed=1), tiny_dab(seed=2)
    m = KDDETR(general_points=5)
    Distiller(dab_s, dab_t, [m])
    g = m.sample_general_points(torch.device("cpu"))
    assert m.query_kind == "anchor" and g.position is None
    assert torch.equal(g.content, torch.zeros(5, 32))
    assert g.reference.shape == (5, 4) and bool(((g.reference > 0) & (g.reference < 1)).all())

    for raw in (False, True):
        m = KDDETR(general_points=64, query_kind="content_box", raw_general_refs=raw)
        m._embed_dim = 8
        g = m.sample_general_points(torch.device("cpu"))
        assert g.content.shape == (64, 8) and g.reference.shape == (64, 4)
        inside = bool(((g.reference > 0) & (g.reference < 1)).all())
        assert inside != raw  # raw N(0,1) values leave [0, 1] (parity flag); sigma keeps them inside


def test_queries_tap_conversions():
    anchors = torch.rand(3, 4)
    g = query_group_from_tap(anchors, "x", batch=2, embed_dim=5)
    assert g.reference.shape == (2, 3, 4) and torch.equal(g.content, torch.zeros(2, 3, 5)) and g.position is None
    tap = QueryGroup("q", torch.rand(2, 3, 5, requires_grad=True), torch.rand(2, 3, 2), torch.rand(2, 3, 5))
    g = query_group_from_tap(tap, "y", batch=2)
    assert g.name == "y" and not g.content.requires_grad and torch.equal(g.position, tap.position)
    with pytest.raises(ValueError, match="embed_dim"):
        query_group_from_tap(anchors, "x", batch=2)


# ------------------------------------------------------------------------------------------------
# any query counts, other families, empty images
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [tiny_deformable, tiny_dab, tiny_dino])
def test_different_query_counts_train_with_finite_losses(make):
    student, teacher = make(seed=1, num_queries=5), make(seed=2, num_queries=9)
    methods = [DETRDistill(topk=7, refine=True), KDDETR(general_points=4, refine=True)]
    distiller = Distiller(student, teacher, methods).train()
    opt = torch.optim.SGD([p for p in distiller.parameters() if p.requires_grad], lr=1e-4)
    for it in range(2):
        losses, stats = run_with_stats(distiller, batch(seed=it, empty_last=True))
        assert all(torch.isfinite(v) for v in losses.values())
        assert any(k.startswith("distill_detrdistill_class") for k in losses)
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    assert 0.0 <= float(stats["tprd_detrdistill_negative_refined_frac"]) <= 1.0


def test_dino_teacher_runs_without_denoising_and_student_with_it():
    student, teacher = tiny_dino(seed=1, num_queries=5), tiny_dino(seed=2, num_queries=7)
    method = KDDETR(general_points=3, refine=True)
    distiller = Distiller(student, teacher, [method]).train()
    seen = {}
    orig = method.losses
    method.losses = lambda ctx: (seen.setdefault("ctx", ctx), orig(ctx))[1]
    losses = distiller(batch())
    ctx = seen["ctx"]
    assert ctx.teacher_out.dn is None and ctx.student_out.dn is not None
    assert "loss_class_dn" in losses and "loss_class_enc" in losses  # the student's own DINO GT loss
    # specific points: the teacher's content queries and its image-dependent selected references
    tap = ctx.teacher_out.taps["queries"]
    spec = ctx.student_out.groups["kd_detr/specific"]
    assert torch.allclose(spec.references[0], tap.reference)
    assert method.query_kind == "content_box"


def test_detrdistill_zero_weight_parts_are_skipped():
    student, teacher = tiny_deformable(seed=1), tiny_deformable(seed=2)
    weights = {t: 0.0 for t in DETRDistill.terms}
    weights["target_aware"] = 2.0
    method = DETRDistill(topk=5, weights=weights)
    distiller = Distiller(student, teacher, [method]).train()
    seen = {}
    orig = method.losses
    method.losses = lambda ctx: (seen.setdefault("ctx", ctx), orig(ctx))[1]
    losses = distiller(batch())
    assert sorted(k for k in losses if k.startswith("distill_")) == ["distill_detrdistill_target_aware",
                                                                      "distill_detrdistill_target_aware_0"]
    assert seen["ctx"].student_out.groups == {}  # no teacher-query group decoded
