"""FGD, FitNet, MGD (docs/methods.md#fgd, #fitnet, #mgd) and TPRD as a method of its own (``tprd_kd``).

* FGD's mask rule on hand-computed cells (a box covering the whole unpadded image of a padded batch,
  two overlapping boxes, an image without boxes, a box touching the border) and docs/methods.md#inv-6;
* FGD / FitNet / MGD losses against their formulas, written out here on tiny random features;
* MGD masks reproducible for (seed, iteration), so a resumed run draws the same masks;
* ``tprd_kd``: zero class term when the student equals the refined teacher; DETRDistill's matching
  KD is the same computation;
* feature-only distillation never runs the teacher's transformer (all three detectors), ``tprd_kd``
  does;
* every FGD/FitNet/MGD[_TPRD] and TPRD config: the method list and the ``_TPRD`` diff; every
  synthetic one trains two iterations through the training entry point.
"""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tprd.distill import FGD, MGD, TPRDKD, DETRDistill, Distiller, FitNet
from tprd.distill.methods.base import DistillContext
from tprd.distill.methods.fgd import fgd_masks
from tprd.distill.methods.mgd import mask_seed
from tprd.distill.tprd import refine_teacher_predictions
from tprd.modeling.matcher import HungarianMatcher
from tprd.modeling.outputs import DetectorOutputs, ImageBatch, StagePredictions

from test_distiller import batch, run_with_stats, tiny_dab, tiny_deformable, tiny_dino

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------
# FGD masks
# ------------------------------------------------------------------------------------------------
# padded batch 64 x 128, level 8 x 16 (8 px per cell); all coordinates dyadic, so exact in float
PADDED, LEVEL = (64, 128), (8, 16)


def _cxcywh(x0, y0, x1, y1, h, w):
    """Pixel xyxy box of an (h, w) image -> normalised cxcywh."""
    return [(x0 + x1) / 2 / w, (y0 + y1) / 2 / h, (x1 - x0) / w, (y1 - y0) / h]


def test_fgd_masks_hand_computed_cells():
    sizes = [(64, 128), (32, 64), (64, 128), (64, 128)]
    boxes = [
        # image 0: two overlapping boxes, pixels (0,0,32,32) -> cells x 0..4, y 0..4 (25 cells)
        # and (16,16,48,24) -> cells x 2..6, y 2..3 (10 cells)
        torch.tensor([_cxcywh(0, 0, 32, 32, 64, 128), _cxcywh(16, 16, 48, 24, 64, 128)]),
        # image 1: 32 x 64 image in the 64 x 128 batch, box = whole image -> x 0..ceil(64/8)=8, y 0..4
        torch.tensor([[0.5, 0.5, 1.0, 1.0]]),
        # image 2: no boxes
        torch.zeros(0, 4),
        # image 3: box touching the right/bottom border, pixels (96,40,128,64) -> x 12..16 -> 15,
        # y 5..8 -> 7: 4 x 3 cells
        torch.tensor([_cxcywh(96, 40, 128, 64, 64, 128)]),
    ]
    fg, bg = fgd_masks(boxes, torch.tensor(sizes), PADDED, LEVEL)
    assert fg.shape == bg.shape == (4, 8, 16)

    expected = torch.zeros(4, 8, 16)
    expected[0, 0:5, 0:5] = 1 / 25
    expected[0, 2:4, 2:7] = 1 / 10  # max over the overlap: 1/10 > 1/25
    expected[1, 0:5, 0:9] = 1 / 45
    expected[3, 5:8, 12:16] = 1 / 12
    torch.testing.assert_close(fg, expected, rtol=0, atol=1e-7)

    free = torch.tensor([128 - 25 - (10 - 6), 128 - 45, 128, 128 - 12], dtype=torch.float32)
    expected_bg = (expected == 0).float() / free[:, None, None]
    torch.testing.assert_close(bg, expected_bg, rtol=0, atol=1e-7)


def test_fgd_masks_spec_invariants():
    """Spec 9.6: a box covering the whole unpadded image has 1/(h'·w') on its cells; the
    background sums to 1 wherever it is non-empty and never overlaps the foreground."""
    g = torch.Generator().manual_seed(0)
    sizes = [(48, 80), (64, 128), (40, 40)]
    boxes = [torch.tensor([[0.5, 0.5, 1.0, 1.0]]), torch.rand(5, 4, generator=g) * 0.5 + 0.25, torch.zeros(0, 4)]
    for level in ((8, 16), (4, 8), (2, 4), (1, 2)):
        fg, bg = fgd_masks(boxes, sizes, PADDED, level)
        h_cov = min(math.ceil(48 * level[0] / 64), level[0] - 1) + 1
        w_cov = min(math.ceil(80 * level[1] / 128), level[1] - 1) + 1
        covered = fg[0] > 0
        assert int(covered.sum()) == h_cov * w_cov and bool(covered[:h_cov, :w_cov].all())
        torch.testing.assert_close(fg[0][covered], torch.full((h_cov * w_cov,), 1.0 / (h_cov * w_cov)))
        assert bool(((fg > 0) & (bg > 0)).sum() == 0)
        sums = bg.sum((1, 2))
        nonempty = (fg == 0).flatten(1).any(1)
        torch.testing.assert_close(sums[nonempty], torch.ones(int(nonempty.sum())))
    # a box over the whole padded map leaves an empty background: all zeros, no division by zero
    fg, bg = fgd_masks([torch.tensor([[0.5, 0.5, 1.0, 1.0]])], [PADDED], PADDED, LEVEL)
    assert bool((fg == 1 / 128).all()) and bool((bg == 0).all())


# ------------------------------------------------------------------------------------------------
# Loss formulas on tiny random features
# ------------------------------------------------------------------------------------------------
def _feature_ctx(student_maps, teacher_maps, boxes=None, padded=(16, 16), sizes=None, iteration=None):
    """A DistillContext holding only neck maps (what the feature methods read)."""
    b = student_maps[0].shape[0]
    sizes = sizes or [padded] * b
    images = ImageBatch(torch.zeros(b, 3, *padded), torch.zeros(b, *padded, dtype=torch.bool), sizes)
    boxes = boxes if boxes is not None else [torch.zeros(0, 4)] * b
    targets = [{"labels": torch.zeros(len(x), dtype=torch.long), "boxes": x} for x in boxes]
    ctx = DistillContext(images, targets, None, None, iteration=iteration)
    ctx.student_out = DetectorOutputs(main=None, taps={"neck": list(student_maps)})
    ctx.teacher_out = DetectorOutputs(main=None, taps={"neck": list(teacher_maps)})
    return ctx


def _maps(shapes, seed, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g).requires_grad_(requires_grad) for s in shapes]


SHAPES = [(2, 4, 4, 6), (2, 4, 2, 3)]


def test_fitnet_matches_its_formula():
    fs, ft = _maps(SHAPES, 0, True), _maps(SHAPES, 1)
    method = FitNet(num_levels=2, channels=4)
    out = method.losses(_feature_ctx(fs, ft))["fitnet"]
    per_level = []
    for conv, s, t in zip(method.adapters, fs, ft):
        w, bias = conv.weight[:, :, 0, 0], conv.bias
        adapted = torch.einsum("oc,bchw->bohw", w, s) + bias[None, :, None, None]
        # mean, then / B with B = the reference's images per process (total batch / 2; one process here)
        per_level.append(((adapted - t) ** 2).sum() / (s.numel() * s.shape[0] / 2))
    torch.testing.assert_close(out, sum(per_level) / 2)
    out.backward()
    assert fs[0].grad is not None and method.adapters[0].weight.grad is not None


def test_mgd_matches_its_formula_and_mask_rule():
    fs, ft = _maps(SHAPES, 2, True), _maps(SHAPES, 3)
    method = MGD(num_levels=2, channels=4, mask_ratio=0.5, seed=7)
    out = method.losses(_feature_ctx(fs, ft, iteration=5))["mgd"]
    # the masks: uniform draws of the (seed 7, iteration 5, rank 0) generator, level by level;
    # a cell is dropped where the draw exceeds 1 - ratio
    g = torch.Generator().manual_seed(mask_seed(7, 5, 0))
    per_level = []
    for adapter, gen, s, t in zip(method.adapters, method.generators, fs, ft):
        b, _, h, w = s.shape
        keep = (torch.rand(b, 1, h, w, generator=g) <= 0.5).float()
        x = F.conv2d(s, adapter.weight, adapter.bias) * keep
        x = F.conv2d(F.relu(F.conv2d(x, gen[0].weight, gen[0].bias, padding=1)), gen[2].weight, gen[2].bias, padding=1)
        per_level.append(((x - t) ** 2).mean() / (b / 2))  # B = total batch / 2
    torch.testing.assert_close(out, sum(per_level) / 2)


def test_mgd_masks_reproducible_for_seed_and_iteration():
    fs, ft = _maps([(2, 4, 32, 32)], 4), _maps([(2, 4, 32, 32)], 5)
    straight = MGD(num_levels=1, channels=4, seed=3)
    resumed = MGD(num_levels=1, channels=4, seed=3)
    resumed.load_state_dict(straight.state_dict())
    run = [float(straight.losses(_feature_ctx(fs, ft, iteration=i))["mgd"].detach()) for i in range(4)]
    # a fresh instance starting at iteration 2 (a resumed run) draws what the straight run drew
    assert [float(resumed.losses(_feature_ctx(fs, ft, iteration=i))["mgd"].detach()) for i in (2, 3)] == run[2:]
    assert len(set(run)) == 4  # every iteration draws new masks
    other_seed = MGD(num_levels=1, channels=4, seed=4)
    other_seed.load_state_dict(straight.state_dict())
    assert float(other_seed.losses(_feature_ctx(fs, ft, iteration=0))["mgd"].detach()) != run[0]
    # about half of the cells are dropped
    keep = (torch.rand(1, 1, 64, 64, generator=straight.generator_for(0)) <= 0.5).float().mean()
    assert 0.45 < float(keep) < 0.55


def test_fgd_level_loss_matches_its_formula():
    torch.manual_seed(0)
    fs, ft = _maps([(2, 4, 4, 8)], 6, True)[0], _maps([(2, 4, 4, 8)], 7)[0]
    boxes = [torch.tensor([[0.25, 0.5, 0.5, 0.5]]), torch.zeros(0, 4)]
    fg, bg = fgd_masks(boxes, [(16, 32), (16, 32)], (16, 32), (4, 8))
    temperature = 0.5

    def attention(x):
        b, c, h, w = x.shape
        s = (x.abs().mean(1) / temperature).reshape(b, -1).softmax(1).reshape(b, h, w) * h * w
        ch = (x.abs().mean((2, 3)) / temperature).softmax(1) * c
        return s, ch

    s_sp, s_ch = attention(fs)
    t_sp, t_ch = attention(ft)
    weight = t_sp[:, None] * t_ch[:, :, None, None]
    d2 = (fs - ft) ** 2
    expected = {
        "fg": (fg[:, None] * weight * d2).sum() / 2,
        "bg": (bg[:, None] * weight * d2).sum() / 2,
        "mask": (s_ch - t_ch).abs().sum() / 2 + (s_sp - t_sp).abs().sum() / 2,
        # context blocks start as the identity (zero last conv), so the relation term is the plain SSE
        "rela": d2.sum() / 2,
    }
    for part in expected:
        inner = dict(zip(("alpha", "beta", "gamma", "lambda_"), [float(part == p) for p in ("fg", "bg", "mask", "rela")]))
        method = FGD(num_levels=1, channels=4, temperature=temperature, **inner)
        torch.testing.assert_close(method.level_loss(method.levels[0], fs, ft, fg, bg), expected[part])
    # the reference's weights and init (docs/methods.md#fgd): mean over levels of 0.001 fg + 0.0005 bg + 0.001 mask + 0.000005 rela
    method = FGD(num_levels=1, channels=4)
    total = method.losses(_feature_ctx([fs], [ft], boxes, padded=(16, 32)))["fgd"]
    torch.testing.assert_close(total, 0.001 * expected["fg"] + 0.0005 * expected["bg"] + 0.001 * expected["mask"]
                               + 0.000005 * expected["rela"])
    block = method.levels[0].student_context
    assert bool((block.conv_mask.bias == 0).all()) and float(block.conv_mask.weight.detach().std()) > 0
    assert bool((block.channel_add[-1].weight == 0).all()) and bool((block.channel_add[-1].bias == 0).all())
    assert method.levels[0].student_context is not method.levels[0].teacher_context


def test_fgd_relation_uses_the_trainable_context():
    """With a non-zero channel-add branch the relation term is Σ(GC_s(F_s) − GC_t(F_t))²/B, with
    GC(F) = F + channel_add(Σ_HW softmax(conv_mask(F))·F); written out here."""
    fs, ft = _maps([(2, 4, 3, 5)], 8, True)[0], _maps([(2, 4, 3, 5)], 9)[0]
    method = FGD(num_levels=1, channels=4, alpha=0.0, beta=0.0, gamma=0.0, lambda_=1.0)
    level = method.levels[0]
    with torch.no_grad():
        for block in (level.student_context, level.teacher_context):
            block.channel_add[-1].weight.normal_()
            block.channel_add[-1].bias.normal_()

    def gc(block, x):
        b, c, h, w = x.shape
        logits = torch.einsum("oc,bchw->bohw", block.conv_mask.weight[:, :, 0, 0], x) + block.conv_mask.bias.view(1, 1, 1, 1)
        p = logits.reshape(b, h * w).softmax(-1)
        context = torch.einsum("bcs,bs->bc", x.reshape(b, c, h * w), p)[:, :, None, None]
        return x + block.channel_add(context)

    fg = bg = torch.zeros(2, 3, 5)
    expected = ((gc(level.student_context, fs) - gc(level.teacher_context, ft)) ** 2).sum() / 2
    torch.testing.assert_close(method.level_loss(level, fs, ft, fg, bg), expected)


# ------------------------------------------------------------------------------------------------
# tprd_kd
# ------------------------------------------------------------------------------------------------
def _prediction_ctx(student, teacher, targets):
    b = teacher.logits.shape[1]
    images = ImageBatch(torch.zeros(b, 3, 8, 8), torch.zeros(b, 8, 8, dtype=torch.bool), [(8, 8)] * b)
    ctx = DistillContext(images, targets, None, None)
    ctx.teacher_out = DetectorOutputs(main=teacher)
    ctx.student_out = DetectorOutputs(main=student)
    return ctx


def _teacher_and_targets(seed=0, stages=3, b=2, q=7, c=4):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(stages, b, q, c, generator=g) * 2
    boxes = torch.cat([torch.rand(stages, b, q, 2, generator=g) * 0.6 + 0.2,
                       torch.rand(stages, b, q, 2, generator=g) * 0.3 + 0.1], -1)
    targets = [
        {"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.6, 0.6, 0.3, 0.2]])},
        {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])},
    ][:b]
    return StagePredictions(logits, boxes), targets


def test_tprd_kd_zero_class_term_when_student_is_the_refined_teacher():
    teacher, targets = _teacher_and_targets()
    matcher = HungarianMatcher(2.0, 5.0, 2.0)
    matches = matcher.match_stages(teacher.logits, teacher.boxes, targets)
    r_logits, r_boxes = refine_teacher_predictions(teacher.logits, teacher.boxes, matches,
                                                   [t["labels"] for t in targets], [t["boxes"] for t in targets])
    assert not torch.equal(r_logits, teacher.logits)  # the case exercises the refinement
    student = StagePredictions(r_logits.clone().requires_grad_(True), r_boxes.clone())
    method = TPRDKD(matcher=matcher)
    out = method.losses(_prediction_ctx(student, teacher, targets))
    assert out["class"].shape == (3,)
    torch.testing.assert_close(out["class"], torch.zeros(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(out["l1"], torch.zeros(3), atol=1e-6, rtol=0)
    # GIoU of a box with itself is area / (area + 1e-6) (detrex's epsilon): small, not 0, for tiny boxes
    torch.testing.assert_close(out["giou"], torch.zeros(3), atol=1e-4, rtol=0)
    assert set(method.last_stats) >= {"tprd_tprd_kd_positive_refined_frac", "tprd_tprd_kd_negative_refined_frac_0"}
    # refine=False: raw targets, soft-BCE class term (the teacher's own entropy when the student copies
    # it), no TPRD diagnostics
    raw_method = TPRDKD(refine=False, matcher=matcher)
    student_raw = StagePredictions(teacher.logits.clone().requires_grad_(True), teacher.boxes.clone())
    raw = raw_method.losses(_prediction_ctx(student_raw, teacher, targets))
    q = teacher.logits.sigmoid()
    entropy = -(q * q.log() + (1 - q) * (1 - q).log()).sum((1, 2, 3)) / (2 * 7)
    torch.testing.assert_close(raw["class"], entropy)
    torch.testing.assert_close(raw["l1"], torch.zeros(3), atol=1e-6, rtol=0)
    assert raw_method.last_stats == {}


@pytest.mark.parametrize("refine", [False, True])
def test_detrdistill_matching_kd_is_tprd_kd(refine):
    """DETRDistill's matching-KD terms and tprd_kd are one computation (same function)."""
    teacher, targets = _teacher_and_targets(seed=1)
    g = torch.Generator().manual_seed(2)
    student = StagePredictions(torch.randn(3, 2, 7, 4, generator=g), torch.rand(3, 2, 7, 4, generator=g) * 0.5 + 0.2)
    off = {"target_aware": 0.0, "prior_class": 0.0, "prior_l1": 0.0, "prior_giou": 0.0}
    detr = DETRDistill(weights={"class": 1.0, "l1": 5.0, "giou": 2.0, **off}, refine=refine)
    a = detr.losses(_prediction_ctx(student, teacher, targets))
    b = TPRDKD(refine=refine).losses(_prediction_ctx(student, teacher, targets))
    assert set(a) == set(b) == {"class", "l1", "giou"}
    for k in a:
        torch.testing.assert_close(a[k], b[k])


# ------------------------------------------------------------------------------------------------
# In the Distiller: the teacher stops at its neck for feature-only methods
# ------------------------------------------------------------------------------------------------
def _transformer_calls(teacher):
    calls = []
    for part in (teacher.transformer.encoder, teacher.transformer.decoder):
        part.register_forward_hook(lambda *a: calls.append(1))
    return calls


@pytest.mark.parametrize("family", ["deformable", "dab", "dino"])
def test_feature_methods_never_run_the_teachers_transformer(family):
    make = {"deformable": tiny_deformable, "dab": tiny_dab, "dino": tiny_dino}[family]
    student, teacher = make(seed=1), make(seed=2)
    levels = {"deformable": 4, "dab": 1, "dino": 4}[family]
    distiller = Distiller(student, teacher, [FGD(), FitNet(), MGD()]).train()
    assert len(distiller.methods[0].levels) == len(distiller.methods[1].adapters) == levels
    calls = _transformer_calls(teacher)
    losses = distiller(batch())
    assert calls == []
    for key in ("distill_fgd_fgd", "distill_fitnet_fitnet", "distill_mgd_mgd"):
        assert torch.isfinite(losses[key]) and float(losses[key]) > 0
    sum(losses.values()).backward()
    assert all(p.grad is not None for m in distiller.methods for p in m.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    # adding tprd_kd needs the teacher's predictions: now the transformer runs
    student, teacher = make(seed=1), make(seed=2)
    distiller = Distiller(student, teacher, [FGD(), TPRDKD()]).train()
    calls = _transformer_calls(teacher)
    losses, stats = run_with_stats(distiller, batch())
    assert calls and "distill_tprd_kd_class_0" in losses and stats


# ------------------------------------------------------------------------------------------------
# Configs
# ------------------------------------------------------------------------------------------------
FOLDERS = {
    "FGD": ["fgd"], "FitNet": ["fitnet"], "MGD": ["mgd"],
    "FGD_TPRD": ["fgd", "tprd_kd"], "FitNet_TPRD": ["fitnet", "tprd_kd"], "MGD_TPRD": ["mgd", "tprd_kd"],
    "TPRD": ["tprd_kd"],
}
SCHEDULES = {
    "deformable_detr": ("deformable_detr_r50_distill_r18_50ep", "deformable_detr_r50_distill_r18_50ep_voc",
                        "deformable_detr_r50_distill_r18_synthetic"),
    "dab_detr": ("dab_detr_r50_distill_r18_50ep", "dab_detr_r50_distill_r18_50ep_voc", "dab_detr_r50_distill_r18_synthetic"),
    "dino": ("dino_r50_distill_r18_4scale_12ep", "dino_r50_distill_r18_4scale_12ep_voc", "dino_r50_distill_r18_synthetic"),
}
CONFIGS = [REPO / "projects" / det / "cfg_distill" / folder / f"{stem}.py"
           for det, stems in SCHEDULES.items() for folder in FOLDERS for stem in stems]
SYNTHETIC = [p for p in CONFIGS if p.name.endswith("_synthetic.py")]


def _cfg_id(path):
    return path.relative_to(REPO).as_posix()


def test_every_detector_has_every_feature_and_tprd_config():
    missing = [_cfg_id(p) for p in CONFIGS if not p.is_file()]
    assert not missing, missing


@pytest.mark.parametrize("path", CONFIGS, ids=_cfg_id)
def test_config_declares_its_methods_and_tprd_diff(path):
    """The method list of each folder; tprd_kd as specified; a ``_TPRD`` config is its baseline plus
    ``model.methods.tprd_kd`` (and its own output folder), nothing else."""
    from omegaconf import OmegaConf

    from test_distiller import _flatten
    from tprd.config import LazyConfig

    folder = path.parent.name
    cfg = LazyConfig.load(str(path))
    assert list(cfg.model.methods) == FOLDERS[folder]
    assert cfg.model.teacher_train_mode is False
    methods = cfg.model.methods
    if "tprd_kd" in methods:
        assert methods.tprd_kd.refine is True and dict(methods.tprd_kd.weights) == {"class": 3.0, "l1": 5.0, "giou": 2.0}
    if "fgd" in methods:
        assert dict(methods.fgd.weights) == {"fgd": 0.05}
        assert (methods.fgd.alpha, methods.fgd.beta, methods.fgd.gamma, methods.fgd.lambda_, methods.fgd.temperature) == (
            0.001, 0.0005, 0.001, 0.000005, 0.5)
    if "fitnet" in methods:
        assert dict(methods.fitnet.weights) == {"fitnet": 10.0}
    if "mgd" in methods:
        assert dict(methods.mgd.weights) == {"mgd": 10.0} and methods.mgd.mask_ratio == 0.5
        assert OmegaConf.to_container(cfg, resolve=False)["model"]["methods"]["mgd"]["seed"] == "${train.seed}"
    if not folder.endswith("_TPRD"):
        return
    base = LazyConfig.load(str(path.parent.parent / folder[: -len("_TPRD")] / path.name))
    a = _flatten(OmegaConf.to_container(base, resolve=False))
    b = _flatten(OmegaConf.to_container(cfg, resolve=False))
    added = set(b) - set(a)
    assert set(a) <= set(b) and added and all(k.startswith("model.methods.tprd_kd.") for k in added)
    assert all(a[k] == b[k] for k in a)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    from tprd.data.synthetic import generate_synthetic_dataset

    root = tmp_path_factory.mktemp("datasets")
    generate_synthetic_dataset(root / "synthetic", num_train=8, num_val=4, seed=3)
    return root


@pytest.mark.parametrize("path", SYNTHETIC, ids=_cfg_id)
def test_synthetic_config_trains_through_the_entry_point(path, datasets, tmp_path, monkeypatch):
    """Two iterations through ``tprd.engine.main`` (what ``projects/<det>/train_net.py`` runs): finite
    losses, every term of every method logged, TPRD diagnostics with ``tprd_kd``, and the teacher's
    transformer runs only when a method needs its predictions."""
    import tprd.engine.main as entry
    from tprd.engine.defaults import default_argument_parser

    monkeypatch.setenv("DETECTRON2_DATASETS", str(datasets))
    calls = []
    build = entry.build_model

    def build_and_watch(cfg):
        model = build(cfg)
        for part in (model.teacher.transformer.encoder, model.teacher.transformer.decoder):
            part.register_forward_hook(lambda *a: calls.append(1))
        return model

    monkeypatch.setattr(entry, "build_model", build_and_watch)
    out = tmp_path / "run"
    entry.main(default_argument_parser().parse_args([
        "--config-file", str(path), f"train.output_dir={out}", "train.max_iter=2", "train.eval_period=0",
        "train.log_period=1", "train.checkpointer.period=2", "dataloader.evaluator=None",
    ]))
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert len(metrics) == 2
    methods = FOLDERS[path.parent.name]
    for m in metrics:
        assert all(math.isfinite(v) for k, v in m.items() if k.startswith(("loss_", "distill_", "total_loss")))
        for name in methods:
            if name == "tprd_kd":
                keys = [f"distill_tprd_kd_{t}{s}" for t in ("class", "l1", "giou") for s in ("", "_0")]
            else:
                keys = [f"distill_{name}_{name}"]
            assert all(k in m for k in keys), (keys, sorted(m))
        stats = [k for k in m if k.startswith("tprd_tprd_kd_")]
        assert bool(stats) == ("tprd_kd" in methods)
        assert all(0.0 <= m[k] <= 1.0 for k in stats)
    assert bool(calls) == ("tprd_kd" in methods)


def test_trainer_hands_the_iteration_to_the_model():
    """MGD's masks depend on the iteration the distiller reads from the event storage: the trainer
    sets it before every step, also when starting at a later iteration (a resumed run)."""
    from torch import nn

    from tprd.engine.trainer import SimpleTrainer
    from tprd.utils.events import get_event_storage

    class Recorder(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(1))
            self.seen = []

        def forward(self, data):
            self.seen.append(get_event_storage().iter)
            return {"loss": (self.w * data[0]).sum()}

    model = Recorder()
    trainer = SimpleTrainer(model, iter(lambda: [torch.ones(1)], None), torch.optim.SGD(model.parameters(), lr=0.1))
    trainer.train(3, 6)
    assert model.seen == [3, 4, 5]
