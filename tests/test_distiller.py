"""Distiller: eval output, frozen eval-mode teacher, loss naming / stage weights, init checkpoints.

Tiny models (ResNet-18, width 32, 1-2 encoder / 2-6 decoder layers, a few queries, 64 px images)
keep every test to CPU seconds. ``tiny_deformable``/``tiny_dab``/``batch`` are shared with
``test_distill_methods.py``.
"""
import copy
import json
from pathlib import Path

import pytest
import torch

from conftest import PARITY_DIR
from tprd.distill import DETRDistill, Distiller, KDDETR
from tprd.distill.methods.base import DistillMethod, expand_stage_terms
from tprd.layers.position_embedding import PositionEmbeddingSine
from tprd.modeling.backbone import ChannelMapper, ResNet
from tprd.modeling.criterion import SetCriterion
from tprd.modeling.dab_detr import DABDETR, DabDetrTransformer, DabDetrTransformerDecoder, DabDetrTransformerEncoder
from tprd.modeling.dino import DINO, DINOCriterion, DINOTransformer, DINOTransformerDecoder
from tprd.modeling.deformable_detr import (
    DeformableDETR,
    DeformableTransformer,
    DeformableTransformerDecoder,
    DeformableTransformerEncoder,
)
from tprd.modeling.matcher import HungarianMatcher
from tprd.utils.events import EventStorage
from tprd.checkpoint.detrex import adapter_for

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest single-threaded, and the CI machine is shared (restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


PARITY = PARITY_DIR / "deformable_detr"


# ------------------------------------------------------------------------------------------------
# tiny models and data
# ------------------------------------------------------------------------------------------------
def gt_weight_dict(num_layers):
    w = {"loss_class": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}
    for l in range(num_layers - 1):
        w.update({f"loss_class_{l}": 1.0, f"loss_bbox_{l}": 5.0, f"loss_giou_{l}": 2.0})
    return w


def tiny_deformable(depth=18, num_queries=6, num_classes=3, layers=2, dim=32, seed=0, dropout=0.0,
                    pixel_mean=(123.675, 116.280, 103.530)):
    torch.manual_seed(seed)
    backbone = ResNet(depth=depth, out_features=("res3", "res4", "res5"), freeze_at=1)
    channels = [backbone.out_channels[k] for k in ("res3", "res4", "res5")]
    neck = ChannelMapper(channels, out_channels=dim, num_outs=4, kernel_size=1, num_groups=32)
    kw = dict(embed_dim=dim, num_heads=4, feedforward_dim=2 * dim, attn_dropout=dropout, ffn_dropout=dropout, num_points=2)
    transformer = DeformableTransformer(DeformableTransformerEncoder(num_layers=1, **kw),
                                        DeformableTransformerDecoder(num_layers=layers, **kw))
    criterion = SetCriterion(num_classes=num_classes, matcher=HungarianMatcher(2.0, 5.0, 2.0),
                             weight_dict=gt_weight_dict(layers))
    return DeformableDETR(backbone, PositionEmbeddingSine(num_pos_feats=dim // 2, normalize=True, offset=-0.5),
                          neck, transformer, num_classes, num_queries, criterion=criterion, embed_dim=dim,
                          pixel_mean=pixel_mean, select_box_nums_for_evaluation=10)


def tiny_dab(depth=18, num_queries=6, num_classes=3, layers=2, dim=32, seed=0):
    torch.manual_seed(seed)
    backbone = ResNet(depth=depth, out_features=("res5",), freeze_at=1)
    kw = dict(embed_dim=dim, num_heads=4, feedforward_dim=2 * dim, num_layers=layers)
    transformer = DabDetrTransformer(DabDetrTransformerEncoder(**{**kw, "num_layers": 1}), DabDetrTransformerDecoder(**kw))
    criterion = SetCriterion(num_classes=num_classes, matcher=HungarianMatcher(2.0, 5.0, 2.0),
                             weight_dict=gt_weight_dict(layers))
    return DABDETR(backbone, transformer, PositionEmbeddingSine(num_pos_feats=dim // 2, temperature=20, normalize=True),
                   num_classes, num_queries, criterion=criterion, in_features=["res5"],
                   in_channels=backbone.out_channels["res5"], embed_dim=dim, select_box_nums_for_evaluation=10)


def tiny_dino(depth=18, num_queries=6, num_classes=3, layers=2, dim=256, seed=0, dn_number=4):
    """DINO's query positions use a fixed 128-per-coordinate sine embedding (as detrex), so the
    width stays 256; everything else is small."""
    torch.manual_seed(seed)
    backbone = ResNet(depth=depth, out_features=("res3", "res4", "res5"), freeze_at=1)
    channels = [backbone.out_channels[k] for k in ("res3", "res4", "res5")]
    neck = ChannelMapper(channels, out_channels=dim, num_outs=4, kernel_size=1, num_groups=32)
    kw = dict(embed_dim=dim, num_heads=4, feedforward_dim=64, attn_dropout=0.0, ffn_dropout=0.0, num_points=2)
    transformer = DINOTransformer(DeformableTransformerEncoder(num_layers=1, **kw),
                                  DINOTransformerDecoder(num_layers=layers, **kw), two_stage_num_proposals=num_queries)
    weights = gt_weight_dict(layers)
    weights.update({k + "_enc": 1.0 for k in ("loss_class", "loss_bbox", "loss_giou")})
    for k, v in {"loss_class": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}.items():
        weights[k + "_dn"] = v
        weights.update({f"{k}_dn_{l}": v for l in range(layers - 1)})
    criterion = DINOCriterion(num_classes=num_classes, matcher=HungarianMatcher(2.0, 5.0, 2.0), weight_dict=weights)
    return DINO(backbone, PositionEmbeddingSine(num_pos_feats=dim // 2, temperature=10000, normalize=True, offset=-0.5),
                neck, transformer, embed_dim=dim, num_classes=num_classes, num_queries=num_queries, criterion=criterion,
                select_box_nums_for_evaluation=10, dn_number=dn_number)


def batch(n=2, size=64, seed=0, num_classes=3, empty_last=False):
    """``n`` images of different sizes (so the batch is padded), 2, 1, ... boxes."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        h, w = size, size - 8 * i
        k = 0 if (empty_last and i == n - 1) else max(2 - i, 1)
        xy = torch.rand(k, 2, generator=g) * (w / 2)
        wh = torch.rand(k, 2, generator=g) * (w / 3) + 4
        out.append({
            "image": torch.rand(3, h, w, generator=g) * 255,
            "height": h,
            "width": w,
            "gt_boxes": torch.cat([xy, xy + wh], 1),
            "gt_classes": torch.randint(0, num_classes, (k,), generator=g),
        })
    return out


def pair(**kw):
    student = tiny_deformable(seed=1, **kw)
    teacher = tiny_deformable(seed=2, num_queries=kw.pop("teacher_queries", 8), **kw)
    return student, teacher


# ------------------------------------------------------------------------------------------------
# eval / train behaviour
# ------------------------------------------------------------------------------------------------
def test_eval_returns_exactly_the_students_detections():
    student, teacher = pair()
    distiller = Distiller(student, teacher, [KDDETR(general_points=4), DETRDistill(topk=5)])
    distiller.eval()
    data = batch()
    with torch.no_grad():
        got = distiller(data)
        ref_model = copy.deepcopy(student).eval()
        want = ref_model(data)
    assert len(got) == len(want) == 2
    for g, w in zip(got, want):
        assert set(g) == set(w) == {"boxes", "scores", "labels"}
        for k in w:
            assert torch.equal(g[k], w[k]), k


def test_teacher_frozen_in_eval_mode_and_gets_no_gradients():
    student, teacher = pair(dropout=0.5)
    distiller = Distiller(student, teacher, [DETRDistill(topk=5, refine=True)])
    assert all(not p.requires_grad for p in teacher.parameters())
    distiller.train()
    assert student.training and not teacher.training
    assert not any(m.training for m in teacher.modules())
    losses = distiller(batch())
    sum(losses.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    # dropout 0.5 in the teacher is inactive: two iterations see the same teacher (the student's
    # own dropout is random, so compare the teacher outputs, via the stored taps of a run)
    images = student.preprocess(batch())
    with torch.no_grad():
        a = distiller._run_teacher(images, [])
        b = distiller._run_teacher(images, [])
    assert torch.equal(a.main.logits, b.main.logits)
    distiller.eval()
    distiller.train(True)
    assert not teacher.training


def test_teacher_train_mode_flag_restores_reference_behaviour():
    student, teacher = pair(dropout=0.5)
    distiller = Distiller(student, teacher, [DETRDistill(topk=5)], teacher_train_mode=True)
    distiller.train()
    assert teacher.training
    images = student.preprocess(batch())
    torch.manual_seed(0)
    a = distiller._run_teacher(images, [])
    b = distiller._run_teacher(images, [])
    assert not torch.equal(a.main.logits, b.main.logits)  # dropout active
    assert a.main.logits.grad_fn is None  # still no graph through the teacher
    distiller.eval()
    assert not teacher.training


def run_with_stats(model, data, forward=None):
    """One training forward inside an event storage (as the trainer runs it): the losses and the
    statistics the model put into the storage."""
    with EventStorage() as storage:
        losses = (forward or model)(data)
    return losses, storage.pop_stats()


def test_six_stage_loss_keys_and_weight_expansion():
    """Every distillation term at all 6 stages (final without suffix, _0 .. _4) with
    the configured weight at each stage."""
    student = tiny_deformable(seed=1, layers=6)
    teacher = tiny_deformable(seed=2, layers=6, num_queries=8)
    data = batch()
    methods_w1 = [DETRDistill(topk=5, refine=True, weights={t: 1.0 for t in DETRDistill.terms}),
                  KDDETR(general_points=4, refine=True, weights={t: 1.0 for t in KDDETR.terms}, seed=3)]
    w_dd = {t: 1.5 + i for i, t in enumerate(DETRDistill.terms)}
    w_kd = {t: 0.25 * (i + 1) for i, t in enumerate(KDDETR.terms)}
    methods_w = [DETRDistill(topk=5, refine=True, weights=w_dd), KDDETR(general_points=4, refine=True, weights=w_kd, seed=3)]
    d1 = Distiller(student, teacher, methods_w1).train()
    d2 = Distiller(student, teacher, methods_w).train()
    torch.manual_seed(0)
    l1, stats1 = run_with_stats(d1, data)
    torch.manual_seed(0)
    l2, _ = run_with_stats(d2, data)  # the same iteration: KD-DETR draws the same general points
    assert list(l1) == list(l2)
    gt_keys = {k for k in l1 if k.startswith("loss_")}
    assert gt_keys == set(gt_weight_dict(6))
    for prefix, weights in (("distill_detrdistill", w_dd), ("distill_kd_detr", w_kd)):
        for term, w in weights.items():
            keys = [f"{prefix}_{term}"] + [f"{prefix}_{term}_{l}" for l in range(5)]
            for k in keys:
                assert k in l1, k
                assert torch.allclose(l2[k], w * l1[k], rtol=1e-5, atol=1e-7), k
            assert f"{prefix}_{term}_5" not in l1
    distill = [k for k in l1 if k.startswith("distill_")]
    assert len(distill) == 6 * (len(DETRDistill.terms) + len(KDDETR.terms))
    # TPRD diagnostics are not losses; they follow the same stage naming
    assert not any(k.startswith("tprd_") for k in l1)
    for m in ("detrdistill", "kd_detr_specific"):
        for stat in ("positive_refined_frac", "negative_refined_frac"):
            for suffix in [""] + [f"_{l}" for l in range(5)]:
                v = stats1[f"tprd_{m}_{stat}{suffix}"]
                assert v.dim() == 0 and 0.0 <= float(v) <= 1.0
    # stage 1 refinement is the identity (docs/methods.md#inv-1)
    assert float(stats1["tprd_kd_detr_specific_positive_refined_frac_0"]) == 0.0
    assert float(stats1["tprd_kd_detr_specific_negative_refined_frac_0"]) == 0.0


def test_expand_stage_terms_naming_by_hand():
    values = {"a": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor(4.0)}
    out = expand_stage_terms("distill_m", values, {"a": 10.0, "b": 0.5})
    assert list(out) == ["distill_m_a", "distill_m_a_0", "distill_m_a_1", "distill_m_b"]
    assert [float(v) for v in out.values()] == [30.0, 10.0, 20.0, 2.0]


class _NeckOnly(DistillMethod):
    """A feature-only method: the teacher must stop after its neck."""

    name = "neckonly"
    terms = ("mse",)
    needs = ("neck",)

    def losses(self, ctx):
        self.seen = ctx.teacher_out
        ft, fs = ctx.teacher_out.taps["neck"], ctx.student_out.taps["neck"]
        return {"mse": sum(((a - b) ** 2).mean() for a, b in zip(ft, fs))}


def test_feature_only_method_runs_teacher_only_to_the_neck():
    student, teacher = pair()
    method = _NeckOnly(weights={"mse": 3.0})
    distiller = Distiller(student, teacher, [method]).train()
    calls = []
    teacher.transformer.encoder.register_forward_hook(lambda *a: calls.append("encoder"))
    losses = distiller(batch())
    assert calls == []  # neither encoder nor decoder ran
    assert method.seen.main is None and len(method.seen.taps["neck"]) == 4
    assert "distill_neckonly_mse" in losses and torch.isfinite(losses["distill_neckonly_mse"])


def test_teacher_backbone_maps_dropped_unless_needed():
    """The teacher's backbone taps are released before the student runs unless a method needs them."""
    student, teacher = pair()
    method = _NeckOnly(weights={"mse": 3.0})
    distiller = Distiller(student, teacher, [method]).train()
    distiller(batch())
    assert "backbone" not in method.seen.taps and len(method.seen.taps["neck"]) == 4
    method.needs = ("backbone", "neck")
    distiller(batch())
    assert "backbone" in method.seen.taps


def test_construction_errors_are_actionable():
    student, teacher = pair()
    other_mean = tiny_deformable(seed=3, pixel_mean=(0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="pixel_mean"):
        Distiller(student, other_mean, [KDDETR()])
    with pytest.raises(ValueError, match="classes"):
        Distiller(student, tiny_deformable(seed=3, num_classes=5), [KDDETR()])
    with pytest.raises(ValueError, match="decoder layers"):  # a deeper teacher pairs (test_stage_pairing.py)
        Distiller(student, tiny_deformable(seed=3, layers=1), [KDDETR()])
    with pytest.raises(ValueError, match="unknown terms"):
        KDDETR(weights={"general_clas": 1.0})
    with pytest.raises(ValueError, match="unique"):
        Distiller(student, teacher, [KDDETR(), KDDETR()])


# ------------------------------------------------------------------------------------------------
# init checkpoints (merge_weight.py output)
# ------------------------------------------------------------------------------------------------
def _fixture_models():
    from tprd.testing.fill import fill_state_dict

    if not PARITY.is_dir():
        pytest.fail(f"parity fixture not found at {PARITY}")
    config = json.loads((PARITY / "config.json").read_text())
    keys = json.loads((PARITY / "keys.json").read_text())
    detrex_sd = fill_state_dict(keys, config.get("alias_groups", []))
    torch.manual_seed(0)
    teacher = adapter_for(DeformableDETR).build(config["reduced_config"])
    student = adapter_for(DeformableDETR).build(config["reduced_config"])
    return student, teacher, detrex_sd


def test_merged_init_checkpoint_loads_teacher_and_student_backbone_completely(tmp_path):
    from torchvision.models import resnet18

    from tprd.checkpoint.merge import merge_weights

    student, teacher, detrex_sd = _fixture_models()
    torchvision_sd = resnet18(weights=None).state_dict()  # an "ImageNet" file in torchvision naming
    merged, _ = merge_weights(torchvision_sd, detrex_sd)
    merged["conv1.weight"] = torchvision_sd["conv1.weight"]  # the reference's un-prefixed duplicates
    path = tmp_path / "init.pth"
    torch.save(merged, path)

    distiller = Distiller(student, teacher, [KDDETR(general_points=4)])
    report = distiller.load_init_checkpoint(str(path))

    want_teacher = adapter_for(DeformableDETR).to_ours(detrex_sd)
    got_teacher = teacher.state_dict()
    assert set(want_teacher) == set(got_teacher)
    for k, v in want_teacher.items():
        assert torch.equal(got_teacher[k], v), k
    # student backbone: torchvision names == our ResNet names
    got_backbone = {k[len("backbone."):]: v for k, v in student.state_dict().items() if k.startswith("backbone.")}
    for k, v in got_backbone.items():
        assert torch.equal(v, torchvision_sd[k]), k
    assert torch.equal(student.transformer.level_embeds, teacher.transformer.level_embeds)
    assert not any(k.startswith("backbone.") for k in report["student_missing"])
    assert "transformer.level_embeds" not in report["student_missing"]
    assert "query_embedding.weight" in report["student_missing"]  # freshly initialised, reported
    assert report["dropped"] == ["conv1.weight"]

    # the training entry point's generic loader (non-strict, fvcore) gets the same result
    from tprd.engine.checkpoint import DetectionCheckpointer

    via_engine = Distiller(*_fixture_models()[:2], [KDDETR(general_points=4)])
    DetectionCheckpointer(via_engine, str(tmp_path)).resume_or_load(str(path), resume=False)
    for k, v in distiller.state_dict().items():
        if not k.startswith("student.") or k[len("student."):] not in report["student_missing"]:
            assert torch.equal(via_engine.state_dict()[k], v), k

    # a distiller checkpoint (our own naming) loads back through the same path
    again = Distiller(*_fixture_models()[:2], [KDDETR(general_points=4)])
    again.load_init_checkpoint(distiller.state_dict())
    for k, v in distiller.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


def test_teacher_with_missing_keys_is_an_error():
    from torchvision.models import resnet18

    from tprd.checkpoint.merge import merge_weights

    student, teacher, detrex_sd = _fixture_models()
    del detrex_sd["query_embedding.weight"]
    merged, _ = merge_weights(resnet18(weights=None).state_dict(), detrex_sd)
    distiller = Distiller(student, teacher, [KDDETR(general_points=4)])
    with pytest.raises(ValueError, match="teacher keys missing") as err:
        distiller.load_init_checkpoint(merged)
    assert "query_embedding.weight" in str(err.value)
    with pytest.raises(ValueError, match="query_embedding.weight"):
        distiller.convert_detrex_state_dict(merged)
    with pytest.raises(ValueError, match="merge_weight.py"):
        distiller.convert_detrex_state_dict({"backbone.stem.conv1.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="query_embedding.weight"):  # also through a non-strict generic load
        distiller.load_state_dict(merged, strict=False)


def test_student_backbone_missing_is_an_error():
    student, teacher, detrex_sd = _fixture_models()
    merged = {"teacher." + k: v for k, v in detrex_sd.items()}
    distiller = Distiller(student, teacher, [KDDETR(general_points=4)])
    with pytest.raises(ValueError, match="student backbone"):
        distiller.load_init_checkpoint(merged)
    with pytest.raises(ValueError, match="student backbone"):
        distiller.load_state_dict(merged, strict=False)


# ------------------------------------------------------------------------------------------------
# configs
# ------------------------------------------------------------------------------------------------
REPO = Path(__file__).resolve().parents[1]
METHOD_KEYS = {"DETRDistill": "detrdistill", "KD_DETR": "kd_detr", "D3DETR": "d3detr", "CrossKD": "crosskd", "QSKD": "qskd"}
# the feature methods and TPRD-alone folders have their own checks in test_feature_methods.py
METHOD_CONFIGS = sorted(p for p in REPO.glob("projects/*/cfg_distill/*/*.py")
                        if p.parent.name.replace("_TPRD", "") in METHOD_KEYS)
SYNTHETIC_CONFIGS = [p for p in METHOD_CONFIGS if p.name.endswith("_synthetic.py")]


def _cfg_id(path):
    return path.relative_to(REPO).as_posix()


def _flatten(node, prefix=""):
    from collections import abc

    if isinstance(node, abc.Mapping):
        out = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(node, (list, tuple)):
        out = {}
        for i, v in enumerate(node):
            out.update(_flatten(v, f"{prefix}.{i}"))
        return out
    return {prefix: node}


@pytest.mark.parametrize("path", METHOD_CONFIGS, ids=_cfg_id)
def test_distill_config_declares_its_method_and_tprd_diff(path):
    """Every method config loads with exactly its method; a ``_TPRD`` config differs from its
    baseline only in refine=True and the docs/methods.md#tprd-variants weights (neither sets an
    output folder: it follows from the path)."""
    from omegaconf import OmegaConf

    from tprd.config import LazyConfig

    folder = path.parent.name
    baseline_folder = folder[: -len("_TPRD")] if folder.endswith("_TPRD") else folder
    key = METHOD_KEYS[baseline_folder]
    cfg = LazyConfig.load(str(path))
    assert list(cfg.model.methods) == [key]
    method = cfg.model.methods[key]
    assert bool(method.refine) == folder.endswith("_TPRD")
    assert cfg.model.teacher_train_mode is False
    if not folder.endswith("_TPRD"):
        return
    base = LazyConfig.load(str(path.parent.parent / baseline_folder / path.name))
    a = _flatten(OmegaConf.to_container(base, resolve=False))
    b = _flatten(OmegaConf.to_container(cfg, resolve=False))
    assert set(a) == set(b)
    changed = {k: (a[k], b[k]) for k in a if a[k] != b[k]}
    prefix = f"model.methods.{key}."
    assert changed.pop(prefix + "refine") == (False, True)
    family = path.parents[2].name
    if key == "detrdistill":
        assert changed.pop(prefix + "weights.class") == (1.0, 4.0)
    if key == "d3detr":
        assert changed.pop(prefix + "weights.class") == (1.0, 3.0)
        assert changed.pop(prefix + "weights.fixed_class") == (1.0, 3.0)
    if key in ("crosskd", "qskd"):  # QSKD: docs/methods.md#tprd-variants; CrossKD_TPRD (ours): the same choice
        assert changed.pop(prefix + "weights.class") == (1.0, 3.0)
    if key == "kd_detr" and family in ("dino", "rt_detr"):  # RT-DETR takes DINO's KD-DETR settings
        assert changed.pop(prefix + "weights.specific_class") == (4.0, 2.0)
        if path.name.endswith("_synthetic.py"):  # the CPU smoke config keeps its small table
            assert prefix + "general_points" not in changed
        else:
            assert changed.pop(prefix + "general_points") == (900, 300)
    assert changed == {}


@pytest.mark.parametrize("path", SYNTHETIC_CONFIGS, ids=_cfg_id)
def test_synthetic_distill_config_trains_two_iterations(path):
    from tprd.config import LazyConfig, instantiate

    cfg = LazyConfig.load(str(path))
    model = instantiate(cfg.model).train()
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    assert all(p.requires_grad is False for p in model.teacher.parameters())
    method = next(iter(model.methods))
    for it in range(2):
        losses, stats = run_with_stats(model, batch(num_classes=5, seed=it, empty_last=(it == 1)))
        bad = [k for k, v in losses.items() if not torch.isfinite(v)]
        assert not bad, bad
        for term in method.terms:
            assert f"distill_{method.name}_{term}" in losses and f"distill_{method.name}_{term}_0" in losses
        if method.refine:
            assert any(k.startswith("tprd_") for k in stats)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()


def test_distill_config_runs_through_the_training_entry_point(tmp_path, monkeypatch):
    from tprd.engine.defaults import default_argument_parser
    from tprd.engine.main import main

    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "datasets"))
    path = REPO / "projects/deformable_detr/cfg_distill/DETRDistill_TPRD/deformable_detr_r50_distill_r18_synthetic.py"
    out = tmp_path / "run"
    args = default_argument_parser().parse_args([
        "--config-file", str(path), f"train.output_dir={out}", "train.max_iter=2", "train.eval_period=0",
        "train.checkpointer.period=2", "dataloader.test.dataset.names=synthetic_val",
    ])
    main(args)
    ckpt = torch.load(out / "model_final.pth", weights_only=False)
    keys = ckpt["model"].keys()
    assert any(k.startswith("student.") for k in keys) and any(k.startswith("teacher.") for k in keys)
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert any("distill_detrdistill_class" in m for m in metrics)
    # the TPRD diagnostics are logged as scalars, outside the loss sum
    stats = [m for m in metrics if any(k.startswith("tprd_") for k in m)]
    assert stats, "TPRD refinement shares missing from metrics.json"
    fracs = [v for k, v in stats[-1].items() if k.startswith("tprd_") and k.endswith("refined_frac")]
    assert fracs and all(0.0 <= v <= 1.0 for v in fracs)
    loss_sum = sum(v for k, v in stats[-1].items() if k.startswith(("loss_", "distill_")))
    assert abs(stats[-1]["total_loss"] - loss_sum) < 1e-3 * max(1.0, abs(loss_sum))

    # train.init_checkpoint with a merged file goes through the Distiller's own loading policy
    teacher_only = {k: v for k, v in ckpt["model"].items() if k.startswith("teacher.")}
    no_query_table = {k: v for k, v in ckpt["model"].items() if k != "teacher.query_embedding.weight"}
    for name, state_dict, error in (
        ("teacher_only", teacher_only, "student backbone keys missing"),
        ("no_query_table", no_query_table, "teacher keys missing"),
    ):
        torch.save(state_dict, tmp_path / f"{name}.pth")
        args = default_argument_parser().parse_args([
            "--config-file", str(path), f"train.output_dir={tmp_path / name}", "train.max_iter=1",
            f"train.init_checkpoint={tmp_path / name}.pth", "train.eval_period=0",
        ])
        with pytest.raises(ValueError, match=error):
            main(args)
