"""RT-DETRv2-L -> RT-DETRv2-S distillation (docs/methods.md#stage-pairing, docs/rt_detr.md#distillation).

* the stage pairing rule (6 -> 3 gives teacher stages 1, 3, 5) and its refusals;
* the pairing inside a method: KD-DETR's B5 is zero at every student stage exactly when the student
  copies the *paired* teacher stages; TPRD refines a paired teacher stage from an unpaired earlier one;
* the distiller on the synthetic RT-DETR pair: teacher stages, the teacher running every decoder layer
  in eval, RT-DETR's focal parameters for DETRDistill's prior assignment;
* every ``projects/rt_detr/cfg_distill/*/*_synthetic.py`` trains 2 iterations through the training entry
  point (what ``projects/rt_detr/train_net.py`` runs) with finite distillation losses and a teacher
  that does not move.
"""
import json
import math
from pathlib import Path

import pytest
import torch

from tprd.distill.methods.base import DistillContext, TPRDOptions
from tprd.distill.methods.common import paired_stages, stage_pairing, tprd_refine_and_targets
from tprd.modeling.outputs import DetectorOutputs, ImageBatch, StagePredictions

REPO = Path(__file__).resolve().parents[1]
SYNTHETIC = sorted(REPO.glob("projects/rt_detr/cfg_distill/*/rtdetrv2_r50vd_distill_r18vd_synthetic.py"))
FOLDERS = ["CrossKD", "D3DETR", "DETRDistill", "FGD", "FitNet", "KD_DETR", "MGD", "QSKD"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------
# the rule
# ------------------------------------------------------------------------------------------------
def test_stage_pairing_rule():
    assert stage_pairing(6, 6) == list(range(6))  # equal depths: stage l <-> stage l, whatever the rule
    assert stage_pairing(3, 3, "last") == [0, 1, 2]
    assert stage_pairing(3, 6) == [1, 3, 5]  # RT-DETRv2-S <- L: uniform, final <-> final
    assert stage_pairing(4, 6) == [0, 2, 3, 5]  # M* <- L
    assert stage_pairing(1, 6) == [5]
    assert stage_pairing(3, 6, "last") == [3, 4, 5]
    assert stage_pairing(3, 6, [0, 2, 5]) == [0, 2, 5]
    with pytest.raises(ValueError, match="student has 6 decoder layers and the teacher 3"):
        stage_pairing(6, 3)
    for bad in ([0, 0, 5], [1, 3], [1, 3, 6]):
        with pytest.raises(ValueError, match="strictly increasing"):
            stage_pairing(3, 6, bad)
    with pytest.raises(ValueError, match="one of"):
        stage_pairing(3, 6, "middle")


def _ctx(student_out, teacher_out, stages, targets):
    images = ImageBatch(tensor=torch.zeros(len(targets), 3, 32, 32), mask=torch.zeros(len(targets), 32, 32, dtype=torch.bool),
                        image_sizes=[(32, 32)] * len(targets))
    ctx = DistillContext(images, targets, None, None, teacher_stages=stages)
    ctx.student_out, ctx.teacher_out = student_out, teacher_out
    return ctx


def _stack(lt, b, q, c, seed):
    g = torch.Generator().manual_seed(seed)
    return StagePredictions(torch.randn(lt, b, q, c, generator=g), torch.rand(lt, b, q, 4, generator=g) * 0.5 + 0.25,
                            torch.randn(lt, b, q, 8, generator=g))


def test_kd_detr_pairs_student_stage_l_with_teacher_stage_2l_plus_1():
    """B5 of identical predictions is 0 (docs/methods.md#inv-4): a student whose specific-group stage
    l is the teacher's stage 2l+1 has zero KD-DETR terms at every stage; any other pairing would not."""
    from tprd.distill import KDDETR

    teacher = _stack(6, 2, 5, 3, seed=0)
    stages = stage_pairing(3, 6)
    copy = paired_stages(teacher, stages)
    method = KDDETR(general_points=0)
    student_out = DetectorOutputs(main=_stack(3, 2, 4, 3, seed=1), groups={method.group_name("specific"): copy})
    ctx = _ctx(student_out, DetectorOutputs(main=teacher), stages, [{"labels": torch.zeros(0, dtype=torch.long),
                                                                      "boxes": torch.zeros(0, 4)}] * 2)
    terms = method.losses(ctx)
    for k in ("specific_class", "specific_l1", "specific_giou"):
        assert terms[k].shape == (3,) and torch.allclose(terms[k], torch.zeros(3), atol=1e-4), (k, terms[k])
    ctx = _ctx(student_out, DetectorOutputs(main=teacher), [3, 4, 5], ctx.targets)  # another pairing: not zero
    assert float(method.losses(ctx)["specific_l1"][:2].min()) > 1e-3


def test_tprd_refines_a_paired_stage_from_an_unpaired_earlier_one():
    """Teacher stage 5 (paired with student stage 2) borrows the box of stage 4, which no student stage
    is paired with; the refined stack is cut to stages [1, 3, 5] with per-student-stage statistics."""
    from tprd.modeling.matcher import HungarianMatcher

    lt, q, c = 6, 3, 2
    gt = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    boxes = torch.tensor([0.3, 0.3, 0.2, 0.2]).repeat(lt, 1, q, 1)
    boxes[:, 0, 0] = torch.tensor([0.45, 0.45, 0.2, 0.2])  # query 0 matches the GT at every stage
    boxes[4, 0, 0] = torch.tensor([0.5, 0.5, 0.2, 0.2])  # stage 4: a perfect box
    logits = torch.full((lt, 1, q, c), -4.0)
    logits[:, 0, 0, 1] = 0.0
    logits[4, 0, 0, 1] = 2.0  # stage 4: more confident too
    teacher = StagePredictions(logits, boxes)
    ctx = _ctx(None, DetectorOutputs(main=teacher), [1, 3, 5], [{"labels": torch.tensor([1]), "boxes": gt}])
    options = TPRDOptions(refine=True, matcher=HungarianMatcher(2.0, 5.0, 2.0))
    r_logits, r_boxes, match_index, _, stats = tprd_refine_and_targets(ctx, teacher, options, "main", stages=[1, 3, 5])
    assert r_logits.shape == (3, 1, q, c) and match_index.shape == (3, 1, q)
    assert torch.equal(r_boxes[2, 0, 0], boxes[4, 0, 0]) and float(r_logits[2, 0, 0, 1]) == 2.0
    assert torch.equal(r_boxes[:2], boxes[[1, 3]])  # stages 1 and 3 have nothing better before them
    assert stats["positive_source_stage"].shape == (3, 1, q) and int(stats["positive_source_stage"][2, 0, 0]) == 4
    assert stats["num_positive_refined"].tolist() == [0, 0, 1]


# ------------------------------------------------------------------------------------------------
# the distiller on the synthetic pair
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def distiller():
    from tprd.config import LazyConfig, instantiate

    cfg = LazyConfig.load(str(REPO / "projects/rt_detr/cfg_distill/DETRDistill/rtdetrv2_r50vd_distill_r18vd_synthetic.py"))
    cfg.model.teacher.decoder.eval_idx = 2  # an RT-DETRv2-M-like teacher that stops early in eval
    return instantiate(cfg.model).train()


def test_distiller_pairs_six_teacher_stages_with_three(distiller):
    assert (distiller.student.num_stages, distiller.teacher.num_stages) == (3, 6)
    assert distiller.teacher_stages == [1, 3, 5]
    assert not distiller.teacher.training and distiller.teacher.eval_all_layers
    assert distiller.teacher.layers_to_run() == 6  # eval_idx 2, but the distiller gets all stages
    # DETRDistill's prior assignment: RT-DETR's focal parameters (its matcher's), not VFL's alpha 0.75
    assert distiller.student.focal_loss_params == (0.25, 2.0)
    assert distiller.student.criterion.alpha == 0.75
    assert distiller.methods[0]._focal == (0.25, 2.0)


def test_method_configs_cover_every_method_and_tprd_variant():
    folders = sorted(p.parent.name for p in SYNTHETIC)
    expected = sorted(FOLDERS + [f + "_TPRD" for f in FOLDERS] + ["TPRD", "base"])
    assert folders == expected
    for folder in expected:
        for split in ("coco", "voc", "synthetic"):
            assert (REPO / "projects/rt_detr/cfg_distill" / folder / f"rtdetrv2_r50vd_distill_r18vd_{split}.py").is_file()


# ------------------------------------------------------------------------------------------------
# every synthetic config through the training entry point
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    from tprd.data.synthetic import generate_synthetic_dataset

    root = tmp_path_factory.mktemp("datasets")
    generate_synthetic_dataset(root / "synthetic", num_train=4, num_val=2, seed=3)
    return root


@pytest.mark.parametrize("path", [p for p in SYNTHETIC if p.parent.name != "base"],
                         ids=lambda p: p.parent.name)
def test_synthetic_config_trains_through_the_entry_point(path, datasets, tmp_path, monkeypatch):
    from tprd.engine.defaults import default_argument_parser
    from tprd.engine.main import main

    monkeypatch.setenv("DETECTRON2_DATASETS", str(datasets))
    out = tmp_path / "run"
    args = default_argument_parser().parse_args([
        "--config-file", str(path), f"train.output_dir={out}", "train.max_iter=2", "train.eval_period=0",
        "train.log_period=1", "train.checkpointer.period=1", "train.checkpointer.max_to_keep=3",
    ])
    main(args)
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    records = [m for m in metrics if "total_loss" in m]
    assert [r["iteration"] for r in records] == [0, 1]
    for record in records:
        distill = {k: v for k, v in record.items() if k.startswith("distill_")}
        assert distill and all(math.isfinite(v) for v in distill.values()), distill
        assert math.isfinite(record["total_loss"])
    if path.parent.name.endswith("_TPRD") or path.parent.name == "TPRD":
        assert any(k.startswith("tprd_") for k in records[-1])
    # the teacher did not move between the first and the last step; the student did
    first = torch.load(out / "model_0000000.pth", map_location="cpu", weights_only=False)["model"]
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    teacher = [k for k in final if k.startswith("teacher.")]
    assert teacher and all(torch.equal(first[k], final[k]) for k in teacher)
    assert any(not torch.equal(first[k], final[k]) for k in final if k.startswith("student.") and final[k].is_floating_point())


def test_kd_detr_own_specific_content_decodes_the_teachers_tokens_with_the_students_features():
    """KD_DETR with specific_content="own": the student decodes the teacher's selected tokens and
    boxes with its own features there (no teacher content vectors), and the losses train."""
    from tprd.config import LazyConfig, instantiate

    cfg = LazyConfig.load(str(REPO / "projects/rt_detr/cfg_distill/KD_DETR/rtdetrv2_r50vd_distill_r18vd_synthetic.py"))
    cfg.model.methods.kd_detr.specific_content = "own"
    torch.manual_seed(0)
    model = instantiate(cfg.model).train()
    seen = {}
    for role in ("student", "teacher"):
        module = getattr(model, role)
        original = module.forward_outputs

        def spy(*args, _original=original, _role=role, **kwargs):
            out = _original(*args, **kwargs)
            seen[_role] = (args, kwargs, out)
            return out

        module.forward_outputs = spy
    g = torch.Generator().manual_seed(0)
    inputs = [{"image": torch.rand(3, 96, 128, generator=g) * 255, "height": 96, "width": 128,
               "gt_boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0]]), "gt_classes": torch.tensor([1])}
              for _ in range(2)]
    losses = model(inputs)
    args, kwargs, _ = seen["student"]
    groups = kwargs.get("query_groups", args[1] if len(args) > 1 else ())
    specific = next(grp for grp in groups if grp.name.endswith("specific"))
    teacher_q = seen["teacher"][2].taps["queries"]
    assert specific.content is None and torch.equal(specific.token_index, teacher_q.token_index)
    assert torch.equal(specific.reference, teacher_q.reference)
    terms = {k: v for k, v in losses.items() if "kd_detr_specific" in k}
    assert {"distill_kd_detr_specific_class", "distill_kd_detr_specific_l1", "distill_kd_detr_specific_giou"} <= set(terms)
    # (a fresh box head returns its reference boxes, so the box terms of an untrained pair can be 0)
    assert all(torch.isfinite(v) for v in terms.values()) and terms["distill_kd_detr_specific_class"] > 0
    sum(losses.values()).backward()
    assert model.student.decoder.enc_output[0].weight.grad is not None
    assert "specific_content='own'" in repr(model.methods[0])


def test_own_specific_content_needs_a_teacher_of_selected_tokens():
    from tprd.distill.methods.base import query_group_from_tap
    from tprd.modeling.outputs import QueryGroup

    tap = QueryGroup("queries", torch.zeros(2, 5, 8), torch.rand(2, 5, 4))  # a DINO-like tap: no tokens
    with pytest.raises(ValueError, match="selected encoder tokens"):
        query_group_from_tap(tap, "kd_detr_specific", 2, 8, own_content=True)
    with pytest.raises(ValueError, match="DINO cannot"):
        QueryGroup("g", None, torch.rand(5, 4), token_index=torch.zeros(1, 5, dtype=torch.long)).require_content("DINO")
