"""Every distillation method against the reference implementation, term by term.

The 16 public fixtures of ``tests/fixtures/reference/distill_parity`` (or
``$TPRD_REFERENCE_DIR/distill_parity``) run once, in one module-scoped pass (about 5-15 s each on
one CPU thread), through ``tprd.testing.distill_parity`` -- the functions of
``tools/distill_parity.py``. Further tests: the recorded random draws are really used, each
reference-compatibility flag changes exactly the terms it claims, the reference's own method
modules load through the init-checkpoint path.
"""
import json
import re

import pytest
import torch

from conftest import DISTILL_PARITY_DIR, REPO
from tprd.testing.distill_parity import (
    LOSS_KEY_MAP,
    REFERENCE_FLAGS,
    DrawReplay,
    DrawReplayError,
    find_distill_fixtures,
    load_distill_fixture,
    run_distill_fixture,
)

FIXTURES = find_distill_fixtures(DISTILL_PARITY_DIR) if DISTILL_PARITY_DIR.is_dir() else []
IDS = [str(p.relative_to(DISTILL_PARITY_DIR)) for p in FIXTURES]
STAGE = re.compile(r"_\d+$")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def results(_one_thread):
    """Every public fixture through our distiller, once."""
    return {name: run_distill_fixture(path) for name, path in zip(IDS, FIXTURES)}


def fixture(name):
    return DISTILL_PARITY_DIR / name


def test_all_sixteen_public_fixtures_present():
    assert DISTILL_PARITY_DIR.is_dir(), f"{DISTILL_PARITY_DIR} is missing (set TPRD_REFERENCE_DIR)"
    methods = {(p.parent.name, p.name) for p in FIXTURES}
    assert len(FIXTURES) == 16, IDS
    assert {m for _, m in methods} >= {"DETRDistill", "DETRDistill_TPRD", "KD_DETR", "KD_DETR_TPRD", "D3DETR",
                                       "D3DETR_TPRD", "QSKD", "QSKD_TPRD", "CrossKD", "FGD", "FitNet", "MGD"}


@pytest.mark.parametrize("name", IDS)
def test_fixture_equals_reference(results, name):
    r = results[name]
    assert r.passed, r.report()
    # every reference key mapped, nothing of ours left over, every term within tolerance
    ref_keys = json.loads((fixture(name) / "losses.json").read_text())["loss_keys"]
    assert [t["ref_key"] for t in r.terms] == ref_keys
    assert not r.unmapped_ref_keys and not r.extra_keys
    # the totals agree too (float32 sums of the same terms)
    ref_total = json.loads((fixture(name) / "losses.json").read_text())["total_loss"]
    assert sum(r.losses.values()) == pytest.approx(ref_total, rel=1e-5, abs=1e-4)


def test_json_contract(results):
    r = results[IDS[0]].to_json()
    assert set(r) == {"fixture", "pass", "terms", "unmapped_ref_keys", "grad_global_norm"}
    assert set(r["terms"][0]) == {"ref_key", "key", "ref", "ours", "abs_diff"}
    assert set(r["grad_global_norm"]) == {"ref", "ours"}
    json.dumps(r)  # plain JSON types


def test_tool_cli_one_fixture(tmp_path):
    """``tools/distill_parity.py --fixture DIR --json OUT`` exits 0 and writes the contract."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("distill_parity_tool", REPO / "tools" / "distill_parity.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "fitnet.json"
    assert tool.main(["--fixture", str(fixture("deformable_detr/FitNet")), "--json", str(out), "--quiet"]) == 0
    data = json.loads(out.read_text())
    assert data["pass"] is True and data["fixture"] == "deformable_detr/FitNet"
    assert {t["key"] for t in data["terms"]} >= {"distill_fitnet_fitnet", "loss_class"}


# ------------------------------------------------------------------------------------------------
# random draws
# ------------------------------------------------------------------------------------------------
def _changed(a, b, tol=1e-7):
    return {k for k in a if abs(a[k] - b[k]) > tol * max(1.0, abs(a[k]))}


def test_injected_mgd_masks_are_used(results):
    """Inverting the recorded MGD masks moves the MGD term and nothing else."""
    base = results["deformable_detr/MGD"]
    flipped = run_distill_fixture(fixture("deformable_detr/MGD"), draw_transform=lambda i, t: 1.0 - t)
    assert not flipped.errors
    assert _changed(base.losses, flipped.losses) == {"distill_mgd_mgd"}


def test_injected_general_points_are_used(results):
    """Other general points (the recorded ones negated) move exactly the KD-DETR general terms."""
    base = results["deformable_detr/KD_DETR"]
    other = run_distill_fixture(fixture("deformable_detr/KD_DETR"), draw_transform=lambda i, t: -t)
    changed = _changed(base.losses, other.losses)
    general = {k for k in base.losses if k.startswith("distill_kd_detr_general_")}
    assert changed == general and len(general) == 18


def test_replay_fails_loudly():
    draws = [{"function": "torch.Tensor.normal_", "shape": [2, 3], "dtype": "float32", "args": [0.0, 1.0],
              "kwargs": {}, "tensor": torch.ones(2, 3)}]
    with DrawReplay(draws) as replay:  # used: returns the recorded value
        assert torch.equal(torch.randn(2, 3), torch.ones(2, 3))
    replay.check_all_used()
    with pytest.raises(DrawReplayError, match="never used"):
        with DrawReplay(draws) as replay:
            pass
        replay.check_all_used()
    with pytest.raises(DrawReplayError, match="no recorded counterpart"):
        with DrawReplay([]):
            torch.rand(2)
    with pytest.raises(DrawReplayError, match="shape"):
        with DrawReplay(draws):
            torch.randn(3, 2)
    with pytest.raises(DrawReplayError, match="uniform"):
        with DrawReplay(draws):
            torch.rand(2, 3)
    assert torch.randn is not None and torch.randn(1).shape == (1,)  # restored


# ------------------------------------------------------------------------------------------------
# reference-compatibility flags: each changes exactly the terms it claims
# ------------------------------------------------------------------------------------------------
def test_every_flag_is_documented_in_the_readme():
    """In docs/parity.md, which the README links as the parity documentation."""
    readme = (REPO / "README.md").read_text()
    assert "docs/parity.md" in readme and "docs/differences.md" in readme
    readme = (REPO / "docs" / "parity.md").read_text()
    for spec in REFERENCE_FLAGS:
        assert re.search(rf"`[^`]*\b{spec['flag']}={spec['value']!r}`", readme), spec["flag"]
    for method, table in LOSS_KEY_MAP.items():
        for ref, ours in table.items():
            assert f"`{ref}`" in readme and f"`{ours}`" in readme, (method, ref)


def test_raw_general_refs_changes_only_dino_general_terms(results):
    base = results["dino/KD_DETR"]
    clean = run_distill_fixture(fixture("dino/KD_DETR"), extra_overrides=["model.methods.kd_detr.raw_general_refs=False"])
    changed = _changed(base.losses, clean.losses)
    assert changed == {k for k in base.losses if k.startswith("distill_kd_detr_general_")}


def test_reference_stage_order_changes_only_qskd_feature_terms(results):
    base = results["deformable_detr/QSKD"]
    clean = run_distill_fixture(fixture("deformable_detr/QSKD"),
                                extra_overrides=["model.methods.qskd.reference_stage_order=False"])
    changed = _changed(base.losses, clean.losses)
    assert changed and changed <= {k for k in base.losses if STAGE.sub("", k) == "distill_qskd_feature"}


@pytest.mark.parametrize("method", ["FitNet", "MGD"])
def test_reference_processes_scales_only_the_feature_term(results, method):
    """The reference divides FitNet's / MGD's MSE by the images of its own process (the fixture's one
    process); our default divides by total batch / 2 on any number of processes: twice the term."""
    key = f"distill_{method.lower()}_{method.lower()}"
    base = results[f"deformable_detr/{method}"]
    clean = run_distill_fixture(fixture(f"deformable_detr/{method}"),
                                extra_overrides=[f"model.methods.{method.lower()}.reference_processes=2"])
    assert _changed(base.losses, clean.losses) == {key}
    assert abs(clean.losses[key] - 2.0 * base.losses[key]) <= 1e-5 * abs(base.losses[key])


def test_skip_empty_images_changes_only_refined_terms():
    """With an image without GT, skipping its refinement changes refined distillation terms only:
    never the student's GT losses nor DETRDistill's unrefined target-aware / prior terms."""
    path = fixture("deformable_detr/DETRDistill_TPRD")
    data = load_distill_fixture(path)
    img = data["input"]["batched_inputs"][1]
    img["gt_boxes_xyxy"], img["gt_classes"] = img["gt_boxes_xyxy"][:0], img["gt_classes"][:0]
    skip = run_distill_fixture(path, fixture=data)
    clean = run_distill_fixture(path, fixture=data,
                                extra_overrides=["model.methods.detrdistill.skip_empty_images=False"])
    changed = _changed(skip.losses, clean.losses)
    refined = {"distill_detrdistill_class", "distill_detrdistill_l1", "distill_detrdistill_giou"}
    assert changed and {STAGE.sub("", k) for k in changed} <= refined
    assert all(not k.endswith("_0") for k in changed)  # stage 1 is never refined


def test_teacher_train_mode_changes_only_distillation_terms():
    """A teacher with dropout: in train mode (the reference) its predictions, hence the distillation
    terms, change; the student's GT losses do not."""
    from test_distiller import batch, tiny_deformable

    from tprd.distill import DETRDistill, Distiller

    losses = {}
    for mode in (False, True):
        student, teacher = tiny_deformable(seed=1), tiny_deformable(seed=2, dropout=0.5)
        distiller = Distiller(student, teacher, [DETRDistill(topk=5)], teacher_train_mode=mode).train()
        torch.manual_seed(0)
        losses[mode] = {k: float(v.detach()) for k, v in distiller(batch()).items()}
    changed = _changed(losses[False], losses[True])
    assert changed and all(k.startswith("distill_detrdistill_") for k in changed)


# ------------------------------------------------------------------------------------------------
# the reference's own method modules load through the init-checkpoint path
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,module_keys", [("deformable_detr/FGD", 64), ("deformable_detr/FitNet", 8),
                                              ("deformable_detr/MGD", 24)])
def test_reference_method_modules_load(results, name, module_keys):
    """Every ``distill_criterion.*`` key of the fixture lands on one of our method parameters (the
    parity run's load report is empty and its gradients of those keys match)."""
    keys = [k for k, _, _ in json.loads((fixture(name) / "keys.json").read_text())]
    assert sum(k.startswith("distill_criterion.") for k in keys) == module_keys
    r = results[name]
    assert not r.errors and not r.grad_failures


def test_unknown_reference_method_keys_are_an_error():
    from test_distiller import tiny_deformable

    from tprd.checkpoint import CheckpointMismatchError
    from tprd.distill import FitNet, Distiller

    distiller = Distiller(tiny_deformable(seed=1), tiny_deformable(seed=2), [FitNet()])
    w = torch.randn(32, 32, 1, 1)
    converted = distiller.convert_reference_method_state_dict({"align.1.weight": w})
    assert torch.equal(converted["methods.0.adapters.1.weight"], w)
    with pytest.raises(CheckpointMismatchError, match=r"distill_criterion\.generation\.0\.0\.weight"):
        distiller.convert_reference_method_state_dict({"generation.0.0.weight": w})


def test_reference_distiller_checkpoint_resumes_through_load_state_dict():
    """A reference-layout distiller state dict (our student/teacher, MGD's modules under the
    reference's ``distill_criterion.align/generation`` names) loads strictly, e.g. when resuming."""
    from test_distiller import tiny_deformable

    from tprd.distill import MGD, Distiller

    source = Distiller(tiny_deformable(seed=1), tiny_deformable(seed=2), [MGD()])
    target = Distiller(tiny_deformable(seed=3), tiny_deformable(seed=4), [MGD()])
    renamed = {}
    for k, v in source.state_dict().items():
        k = re.sub(r"^methods\.0\.adapters\.", "distill_criterion.align.", k)
        renamed[re.sub(r"^methods\.0\.generators\.", "distill_criterion.generation.", k)] = v
    assert any(k.startswith("distill_criterion.generation.") for k in renamed)
    target.load_state_dict(renamed, strict=True)
    for k, v in source.state_dict().items():
        assert torch.equal(target.state_dict()[k], v), k


def test_key_mapping_and_verdict():
    from tprd.testing.distill_parity import DistillParityResult, map_loss_key

    ours = {"loss_giou_enc": 0, "distill_kd_detr_general_giou_3": 0, "distill_kd_detr_specific_l1": 0}
    assert map_loss_key("KD_DETR", "auxilary_loss_giou_3", ours) == "distill_kd_detr_general_giou_3"
    assert map_loss_key("KD_DETR", "teacher_loss_bbox", ours) == "distill_kd_detr_specific_l1"
    assert map_loss_key("KD_DETR", "loss_giou_enc", ours) == "loss_giou_enc"
    assert map_loss_key("KD_DETR", "teacher_loss_bbox_2", ours) is None  # not produced by us
    assert map_loss_key("KD_DETR", "something_else", ours) is None
    term = {"ref_key": "a", "key": "a", "ref": 2.0, "ours": 2.0001, "abs_diff": 1e-4}
    ok = DistillParityResult("x", terms=[term], grad_global_norm={"ref": 1.0, "ours": 1.0})
    assert ok.passed
    assert not DistillParityResult("x", terms=[term], unmapped_ref_keys=["b"], grad_global_norm={"ref": 1.0, "ours": 1.0}).passed
    assert not DistillParityResult("x", terms=[dict(term, abs_diff=1e-3)], grad_global_norm={"ref": 1.0, "ours": 1.0}).passed
    assert not DistillParityResult("x", terms=[term], grad_global_norm={"ref": 1.0, "ours": 1.01}).passed
