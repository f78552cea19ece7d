"""RT-DETR distillation init files (docs/rt_detr.md#initial-weights): ``merge_weight.py`` with the
reference's ImageNet PResNet-18vd file and an official RT-DETRv2-L checkpoint, both made up from the
official key lists (tests/fixtures/reference/rtdetr_keys/). Every tensor is a one-element storage
broadcast to its shape, so the files stay tiny.

* the teacher is taken from the checkpoint's EMA weights (``ema/module``), not ``model``;
* the student backbone keys are the model's own PResNet names; ``num_batches_tracked`` is dropped;
* the merged file loads into the L -> S COCO distiller: teacher complete (EMA values), student
  backbone complete; the other student parts start fresh;
* swapped inputs are refused before anything is written.
"""
import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO, RTDETR_KEYS_DIR

DTYPES = {"float32": torch.float32, "int64": torch.int64, "bool": torch.bool}


def key_list(name):
    return json.loads((RTDETR_KEYS_DIR / f"{name}.json").read_text())


def filled(entries, value, prefix=""):
    """``{key: tensor}`` of the listed keys (optionally only those under ``prefix``, which is removed)."""
    out = {}
    for key, shape, dtype in entries:
        if not key.startswith(prefix):
            continue
        one = torch.full((1,) * len(shape) if shape else (), value).to(DTYPES[dtype])
        out[key[len(prefix):]] = one.expand(shape) if shape else one
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("rtdetr_init")
    imagenet = filled(key_list("rtdetrv2_r18vd_120e_coco"), 0.5, prefix="backbone.")
    teacher_keys = key_list("rtdetrv2_r50vd_6x_coco")
    official = {"date": "2024", "last_epoch": 71, "model": filled(teacher_keys, 2.0),
                "ema": {"module": filled(teacher_keys, 3.0), "updates": 12345}}
    torch.save(imagenet, root / "ResNet18_vd_pretrained_from_paddle.pth")
    torch.save(official, root / "rtdetrv2_r50vd_6x_coco_ema.pth")
    out = root / "init.pth"
    proc = subprocess.run([sys.executable, "merge_weight.py", "--input1", str(root / "ResNet18_vd_pretrained_from_paddle.pth"),
                           "--input2", str(root / "rtdetrv2_r50vd_6x_coco_ema.pth"), "--output", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return root, out, proc.stdout


def test_merge_takes_the_ema_teacher_and_the_presnet_backbone(files):
    root, out, log = files
    merged = torch.load(out, map_location="cpu", weights_only=False)
    assert "weights unwrapped from ema / module" in log
    assert "student backbone (PResNet-18vd)" in log and "every key matched" in log
    teacher = {k[len("teacher."):]: v for k, v in merged.items() if k.startswith("teacher.")}
    assert set(teacher) == {k for k, _, _ in key_list("rtdetrv2_r50vd_6x_coco")}
    assert all(float(v.float().flatten()[0]) == 3.0 for k, v in teacher.items() if v.is_floating_point())
    student = {k for k in merged if k.startswith("student.")}
    expected = {"student." + k for k, _, _ in key_list("rtdetrv2_r18vd_120e_coco")
                if k.startswith("backbone.") and not k.endswith("num_batches_tracked")}
    assert student == expected


def test_merged_file_loads_into_the_coco_distiller(files):
    from tprd.config import LazyConfig, instantiate

    _, out, _ = files
    cfg = LazyConfig.load(str(REPO / "projects/rt_detr/cfg_distill/base/rtdetrv2_r50vd_distill_r18vd_coco.py"))
    model = instantiate(cfg.model)
    report = model.load_init_checkpoint(str(out))
    assert report["unexpected"] == [] and report["dropped"] == []
    assert not any(k.startswith("backbone.") and not k.endswith("num_batches_tracked") for k in report["student_missing"])
    assert any(k.startswith("decoder.") for k in report["student_missing"])  # the rest of the student starts fresh
    assert model.teacher.decoder.dec_score_head[0].weight[0, 0].item() == 3.0  # the EMA weights
    assert model.student.backbone.conv1.conv1_1.conv.weight[0, 0, 0, 0].item() == 0.5


def test_swapped_inputs_are_refused(files):
    root, _, _ = files
    proc = subprocess.run([sys.executable, "merge_weight.py", "--input1", str(root / "rtdetrv2_r50vd_6x_coco_ema.pth"),
                           "--input2", str(root / "ResNet18_vd_pretrained_from_paddle.pth"), "--output",
                           str(root / "never.pth")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and not (root / "never.pth").exists()
    assert "RT-DETR checkpoint" in proc.stderr and "swapped" in proc.stderr
