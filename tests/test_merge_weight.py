"""merge_weight.py: torchvision student backbone + detrex teacher -> reference-format init file."""
import json
import os
import stat
import subprocess
import sys

import torch
import torchvision

from conftest import DETREX_KEYS_DIR, REPO
from tprd.testing.fill import fill_value
from tprd.checkpoint.merge import load_state_dict_file, merge_weights


def _detrex_state_dict(name):
    rows = json.loads((DETREX_KEYS_DIR / f"{name}.json").read_text())
    return {k: fill_value(k, shape) for k, shape, _ in rows}


def test_cli_round_trip_matches_official_student_backbone_keys(tmp_path):
    tv = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(tv, tmp_path / "resnet18.pth")
    teacher = _detrex_state_dict("deformable_detr_r50")
    torch.save({"model": teacher, "iteration": 5}, tmp_path / "teacher.pth")
    out = tmp_path / "init" / "merged.pth"
    proc = subprocess.run(
        [sys.executable, str(REPO / "merge_weight.py"), "--input1", str(tmp_path / "resnet18.pth"),
         "--input2", str(tmp_path / "teacher.pth"), "--output", str(out)],
        capture_output=True, text=True, check=True, preexec_fn=lambda: os.umask(0o022),
    )
    assert "every key matched" in proc.stdout
    assert stat.S_IMODE(out.stat().st_mode) == 0o644  # the umask's permissions, not mkstemp's 0600
    merged = load_state_dict_file(out)
    official_student = {k for k, _, _ in json.loads((DETREX_KEYS_DIR / "deformable_detr_r18_student.json").read_text())}
    student_backbone = {k[len("student."):] for k in merged if k.startswith("student.backbone.")}
    assert student_backbone == {k for k in official_student if k.startswith("backbone.")}
    # values survive the renaming
    torch.testing.assert_close(merged["student.backbone.res3.0.conv1.norm.running_var"], tv["layer2.0.bn1.running_var"])
    torch.testing.assert_close(merged["student.backbone.res4.0.shortcut.weight"], tv["layer3.0.downsample.0.weight"])
    # every teacher key, prefixed, unchanged
    assert {k for k in merged if k.startswith("teacher.")} == {"teacher." + k for k in teacher}
    torch.testing.assert_close(merged["teacher.query_embedding.weight"], teacher["query_embedding.weight"])
    # level embeddings copied to the student; no un-prefixed duplicates
    torch.testing.assert_close(merged["student.transformer.level_embeds"], teacher["transformer.level_embeds"])
    assert all(k.startswith(("student.", "teacher.")) for k in merged)
    assert not list(tmp_path.joinpath("init").glob("*.tmp"))


def test_detectron2_named_backbone_and_mismatch_report():
    d2 = {k[len("backbone."):]: v for k, v in _detrex_state_dict("deformable_detr_r18_student").items()
          if k.startswith("backbone.")}
    merged, report = merge_weights(d2, {})
    assert report.backbone_depth == 18 and not report.backbone_missing and len(report.student_backbone) == len(d2)
    partial = dict(d2)
    partial.pop("res2.0.conv1.weight")
    _, report = merge_weights(partial, {})
    assert report.backbone_missing == ["res2.0.conv1.weight"]
    assert "NOT matched" in report.summary()


def test_report_names_the_backbone_only_when_it_recognises_it():
    d2 = {k[len("backbone."):]: v for k, v in _detrex_state_dict("deformable_detr_r18_student").items()
          if k.startswith("backbone.")}
    assert merge_weights(d2, {})[1].summary().startswith("student backbone (ResNet-18)")
    # a distiller's own student.* keys are taken as they are: no depth is claimed for them
    given = {"student.backbone." + k: v for k, v in d2.items()}
    summary = merge_weights(given, {})[1].summary()
    assert summary.startswith("student backbone (student.* keys as given)") and "ResNet-0" not in summary
    assert merge_weights({"foo.weight": torch.zeros(2)}, {})[1].summary().startswith(
        "student backbone (ResNet of unrecognised depth)")


def test_missing_file_is_a_clear_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "merge_weight.py"), "--input1", str(tmp_path / "nope.pth"),
         "--input2", str(tmp_path / "t.pth"), "--output", str(tmp_path / "o.pth")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2 and "nope.pth" in proc.stderr
