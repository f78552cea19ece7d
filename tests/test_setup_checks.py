"""A user's mistakes caught before they cost a run (issue 24): datasets checked at load, the one
error path of the engine (``error: ...``, exit 2, no traceback, nothing written), distillation
set-ups, ``merge_weight.py`` input validation and ``tools/check_dataset.py``.

Every case corrupts a copy of one tiny COCO dataset (made once per module) or builds a tiny
checkpoint in ``tmp_path``; runs go through ``tprd.engine.main.run`` in-process, 1-2 iterations.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tprd.data import DatasetCatalog, MetadataCatalog
from tprd.data.synthetic import generate_synthetic_dataset
from tprd.engine.main import run

REPO = Path(__file__).resolve().parents[1]
CUSTOM = REPO / "projects/deformable_detr/configs/deformable_detr_r50_custom_coco.py"
DISTILL = REPO / "projects/deformable_detr/cfg_distill/DETRDistill/deformable_detr_r50_distill_r18_synthetic.py"

# the custom-data template shrunk to seconds on a CPU
SMALL = [
    "train.device=cpu", "train.max_iter=1", "train.log_period=1", "dataloader.train.total_batch_size=2",
    "dataloader.train.num_workers=0", "dataloader.test.num_workers=0",
    "dataloader.train.mapper.augmentation.1.short_edge_length=[64]",
    "dataloader.train.mapper.augmentation.1.max_size=80", "dataloader.train.mapper.augmentation_with_crop=None",
    "dataloader.test.mapper.augmentation.0.short_edge_length=64", "dataloader.test.mapper.augmentation.0.max_size=80",
    "model.transformer.encoder.num_layers=1", "model.transformer.decoder.num_layers=1", "model.aux_loss=False",
    "model.num_queries=10", "model.select_box_nums_for_evaluation=10", "model.backbone.depth=18",
    "model.neck.in_channels=[128,256,512]",
]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pristine")
    generate_synthetic_dataset(root / "my_dataset", num_train=4, num_val=2, seed=5, image_size=(64, 80))
    return root


@pytest.fixture
def data(tmp_path, pristine, monkeypatch) -> Path:
    """A fresh copy of the dataset as ``$DETECTRON2_DATASETS``; returns ``<root>/my_dataset``."""
    root = tmp_path / "datasets"
    shutil.copytree(pristine, root)
    monkeypatch.setenv("DETECTRON2_DATASETS", str(root))
    monkeypatch.delenv("TPRD_DEBUG", raising=False)
    yield root / "my_dataset"
    DatasetCatalog.clear_preloaded()


def _json(data: Path, split: str = "train") -> Path:
    return data / "annotations" / f"instances_{split}.json"


def _edit(data: Path, split: str, fn) -> None:
    path = _json(data, split)
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))


def _run(tmp_path, *extra, config=CUSTOM, flags=()):
    out = tmp_path / "run"
    argv = ["--config-file", str(config), *flags, f"train.output_dir={out}", *SMALL, *extra]
    return run(argv), out


def _user_error(capsys, tmp_path, *extra, config=CUSTOM, flags=(), out_exists=False) -> str:
    """Run, expect exit 2 with one ``error:`` line and no traceback; nothing written."""
    with pytest.raises(SystemExit) as info:
        _run(tmp_path, *extra, config=config, flags=flags)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    if not out_exists:
        assert not (tmp_path / "run").exists()
    return lines[0]


# ------------------------------------------------------------------------------- dataset errors
def test_json_that_does_not_parse_names_file_line_and_column(data, tmp_path, capsys):
    path = _json(data)
    path.write_text('{"images": [],\n "annotations": [,]}')
    line = _user_error(capsys, tmp_path)
    assert str(path) in line and "line 2" in line and "column" in line


def test_category_id_used_but_not_listed(data, tmp_path, capsys):
    _edit(data, "train", lambda d: d["annotations"][0].update(category_id=99))
    line = _user_error(capsys, tmp_path)
    assert "category_id 99" in line and "categories" in line and str(_json(data)) in line


def test_num_classes_smaller_than_the_dataset(data, tmp_path, capsys):
    line = _user_error(capsys, tmp_path, "model.num_classes=3")
    assert "model.num_classes=5" in line


def test_training_set_without_annotations(data, tmp_path, capsys):
    _edit(data, "train", lambda d: d.update(annotations=[]))
    line = _user_error(capsys, tmp_path)
    assert "my_dataset_train" in line and "no usable annotation" in line


def test_missing_dataset_root(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "nowhere"))
    line = _user_error(capsys, tmp_path)
    assert "nowhere" in line and "DETECTRON2_DATASETS" in line


def test_missing_image_files_counted_and_named(data, tmp_path, capsys):
    names = sorted(p.name for p in (data / "train").iterdir())
    for name in names[:2]:
        (data / "train" / name).unlink()
    line = _user_error(capsys, tmp_path)
    assert "2 of 4 image files" in line and names[0] in line and "check_dataset" in line


def test_missing_voc_split_file(tmp_path, capsys, monkeypatch):
    root = tmp_path / "datasets"
    generate_synthetic_dataset(tmp_path / "gen", num_train=2, num_val=1, seed=3, image_size=(64, 80))
    shutil.copytree(tmp_path / "gen" / "VOC", root / "VOC2007")
    (root / "VOC2007/ImageSets/Main/trainval.txt").unlink()
    monkeypatch.setenv("DETECTRON2_DATASETS", str(root))
    cfg = REPO / "projects/deformable_detr/configs/deformable_detr_r50_50ep_voc.py"
    with pytest.raises(SystemExit):
        run(["--config-file", str(cfg), f"train.output_dir={tmp_path / 'run'}", "train.device=cpu"])
    err = capsys.readouterr().err
    assert "Traceback" not in err and not (tmp_path / "run").exists()
    line = err.strip().splitlines()[-1]
    assert "VOC2007/ImageSets/Main/trainval.txt" in err and "DETECTRON2_DATASETS" in line


def test_evaluator_of_another_layout(data, tmp_path, capsys):
    line = _user_error(capsys, tmp_path, "dataloader.test.dataset.names=synthetic_voc_test",
                       "dataloader.evaluator.dataset_name=synthetic_voc_test")
    assert "synthetic_voc_test" in line and "PascalVOCDetectionEvaluator" in line


def test_unregistered_dataset_name(data, tmp_path, capsys):
    line = _user_error(capsys, tmp_path, "dataloader.test.dataset.names=no_such_set")
    assert "'no_such_set' is not registered" in line


@pytest.mark.parametrize("workers", [0, 1])
def test_undecodable_image_during_training_names_file_and_tool(data, tmp_path, capsys, workers):
    name = sorted(p.name for p in (data / "train").iterdir())[0]
    (data / "train" / name).write_bytes(b"not an image")
    # every train image is one batch of 4 images: the broken one is read at iteration 0 (in a
    # DataLoader worker, the message comes back without the worker's traceback)
    line = _user_error(capsys, tmp_path, "dataloader.train.total_batch_size=4",
                       f"dataloader.train.num_workers={workers}", out_exists=True)
    assert line.startswith("error: cannot decode image file") and name in line and "tools/check_dataset.py" in line
    assert not (tmp_path / "run" / "model_final.pth").exists()
    assert "before any checkpoint was written" in (tmp_path / "run" / "log.txt").read_text()


def test_debug_shows_the_traceback(data, tmp_path, capsys):
    _edit(data, "train", lambda d: d["annotations"][0].update(category_id=99))
    with pytest.raises(Exception, match="category_id 99"):
        _run(tmp_path, flags=("--debug",))


# ------------------------------------------------------------------ skipped annotations, counted
def _corrupt_boxes(d):
    anns = d["annotations"]
    anns[0]["image_id"] = 12345          # unknown image
    anns[1]["bbox"] = [1, 2, 0, 5]       # zero width
    anns[2]["bbox"] = [1, 2, -3, 5]      # negative width
    anns[3]["bbox"] = [500, 500, 10, 10]  # outside its 80x64 image
    anns[4]["bbox"] = [1, "x", 3, 4]     # not four numbers
    return [a["id"] for a in anns[:5]]


def test_skipped_annotations_one_warning_and_loaded_counts_what_is_used(data, tmp_path, capsys):
    ids = []
    _edit(data, "train", lambda d: ids.extend(_corrupt_boxes(d)))
    total = len(json.loads(_json(data).read_text())["annotations"])
    _, out = _run(tmp_path)
    log = (out / "log.txt").read_text()
    warn = [line for line in log.splitlines() if "my_dataset_train: skipped" in line]
    assert len(warn) == 1, warn
    assert f"skipped 5 of {total} annotations" in warn[0]
    assert f"1 with an image_id not in images (id {ids[0]})" in warn[0]
    assert f"2 with zero or negative size (ids {ids[1]}, {ids[2]})" in warn[0]
    assert f"1 outside its image (id {ids[3]})" in warn[0]
    assert "1 whose bbox is not four finite numbers" in warn[0]
    assert f"Loaded 4 images, {total - 5} annotations" in log
    assert (out / "model_final.pth").is_file()


def test_strict_turns_skips_into_an_error(data, tmp_path, capsys):
    _edit(data, "train", _corrupt_boxes)
    line = _user_error(capsys, tmp_path, "+dataloader.train.dataset.strict=True")
    assert "skipped 5 of" in line and "strict" in line


def test_evaluation_scores_against_the_kept_ground_truth(data, tmp_path):
    from tprd.evaluation import COCOEvaluator

    ids = []
    _edit(data, "val", lambda d: ids.append(d["annotations"][0]["id"]) or d["annotations"][0].update(bbox=[1, 1, 0, 0]))
    from tprd.engine.main import load_config

    load_config(str(CUSTOM))  # registers the datasets (the config does)
    ev = COCOEvaluator("my_dataset_val")
    kept = {a["id"] for a in ev.coco_gt.dataset["annotations"]}
    assert ids[0] not in kept and kept
    records = DatasetCatalog.get("my_dataset_val")
    assert sum(len(r["classes"]) for r in records) == len(kept)


def test_eval_only_warns_for_a_split_without_annotations(data, tmp_path, capsys):
    _run(tmp_path)
    _edit(data, "val", lambda d: d.update(annotations=[]))
    ckpt = tmp_path / "run" / "model_final.pth"
    out = tmp_path / "eval"
    run(["--config-file", str(CUSTOM), "--eval-only", f"train.output_dir={out}", *SMALL,
         f"train.init_checkpoint={ckpt}"])
    log = (out / "log.txt").read_text()
    assert "my_dataset_val has no annotation" in log and "nan" in log


def test_eval_only_class_count_mismatch_before_any_folder(data, tmp_path, capsys):
    ckpt = tmp_path / "weights.pth"
    torch.save({"model": {"x": torch.zeros(1)}}, ckpt)
    with pytest.raises(SystemExit):
        run(["--config-file", str(CUSTOM), "--eval-only", *SMALL, f"train.init_checkpoint={ckpt}",
             "model.num_classes=3"])
    err = capsys.readouterr().err
    assert "model.num_classes=5" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["datasets", "weights.pth"]  # no eval_weights folder


def test_eval_only_with_a_broken_test_json_writes_nothing(data, tmp_path, capsys):
    _run(tmp_path)
    _edit(data, "val", lambda d: d["annotations"][0].update(category_id=42))
    ckpt = tmp_path / "run" / "model_final.pth"
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    with pytest.raises(SystemExit) as info:
        run(["--config-file", str(CUSTOM), "--eval-only", *SMALL, f"train.init_checkpoint={ckpt}"])
    assert info.value.code == 2
    assert "category_id 42" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before  # no eval_model_final folder


def test_voc_skips_and_unknown_class(tmp_path):
    from tprd.data.datasets import load_voc_instances
    from tprd.errors import DatasetError

    root = tmp_path / "d"
    generate_synthetic_dataset(root, num_train=2, num_val=1, seed=3, image_size=(64, 80))
    voc = root / "VOC"
    fid = (voc / "ImageSets/Main/trainval.txt").read_text().split()[0]
    xml = voc / "Annotations" / f"{fid}.xml"
    text = xml.read_text()
    start = text.index("<xmax>") + len("<xmax>")
    end = text.index("</xmax>")
    xml.write_text(text[:start] + "-5" + text[end:])
    from tprd.data.synthetic import SYNTHETIC_CLASSES

    records = load_voc_instances(voc, "trainval", SYNTHETIC_CLASSES)
    assert records
    with pytest.raises(DatasetError, match="skipped 1 of"):
        load_voc_instances(voc, "trainval", SYNTHETIC_CLASSES, strict=True)
    with pytest.raises(DatasetError, match="not one of the dataset's"):
        load_voc_instances(voc, "trainval", SYNTHETIC_CLASSES[:1])


# ------------------------------------------------------------------------------ distillation set-ups
TEACHER_CFG = REPO / "projects/deformable_detr/configs/deformable_detr_r50_synthetic.py"
KD_DETR = REPO / "projects/deformable_detr/cfg_distill/KD_DETR/deformable_detr_r50_distill_r18_synthetic.py"
TINY = ["train.device=cpu", "train.max_iter=1", "train.log_period=1", "dataloader.train.num_workers=0",
        "dataloader.test.num_workers=0", "train.checkpointer.period=1"]


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    generate_synthetic_dataset(root / "synthetic", num_train=4, num_val=2, seed=2, image_size=(64, 80))
    return root


@pytest.fixture(scope="module")
def teacher_init(synth_root, tmp_path_factory):
    """The README walk on the smallest scale: the synthetic teacher trained 1 iteration, a (random)
    ResNet-18 student backbone, merged by merge_weight.py."""
    import torchvision

    import merge_weight

    mp = pytest.MonkeyPatch()
    mp.setenv("DETECTRON2_DATASETS", str(synth_root))
    work = tmp_path_factory.mktemp("teacher")
    run(["--config-file", str(TEACHER_CFG), f"train.output_dir={work / 'teacher'}", *TINY])
    torch.save(torchvision.models.resnet18().state_dict(), work / "r18.pth")
    assert merge_weight.main(["--input1", str(work / "r18.pth"), "--input2", str(work / "teacher/model_final.pth"),
                              "--output", str(work / "init.pth")]) == 0
    mp.undo()
    return work


@pytest.fixture
def synth(synth_root, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(synth_root))
    monkeypatch.delenv("TPRD_DEBUG", raising=False)
    return synth_root


def _distill_error(capsys, tmp_path, *extra, config=DISTILL, flags=(), out_exists=False) -> str:
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        run(["--config-file", str(config), *flags, f"train.output_dir={out}", *TINY, *extra])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    if not out_exists:
        assert not out.exists()
    return lines[0]


def test_distiller_without_teacher_weights_is_refused(synth, tmp_path, capsys):
    line = _distill_error(capsys, tmp_path, "train.allow_random_teacher=False")
    assert "train.init_checkpoint" in line and "merge_weight.py" in line and "allow_random_teacher" in line


def test_random_teacher_allowed_warns_and_the_run_writes_its_detections(synth, tmp_path):
    out = tmp_path / "run"
    run(["--config-file", str(DISTILL), f"train.output_dir={out}", *TINY])
    log = (out / "log.txt").read_text()
    assert log.count("The teacher is RANDOM") == 1
    assert (out / "coco_instances_results.json").is_file()


def test_distil_from_the_merged_teacher_then_resume_with_another_method(synth, tmp_path, capsys, teacher_init):
    out = tmp_path / "run"
    init = teacher_init / "init.pth"
    run(["--config-file", str(DISTILL), f"train.output_dir={out}", *TINY, f"train.init_checkpoint={init}",
         "train.max_iter=2", "train.checkpointer.period=1"])
    log = (out / "log.txt").read_text()
    assert "The teacher is RANDOM" not in log and "teacher complete" in log
    (out / "model_final.pth").unlink()
    (out / "last_checkpoint").write_text("model_0000000.pth")
    saved = (out / "config.yaml").read_text()
    metrics = (out / "metrics.json").read_text()
    with pytest.raises(SystemExit):
        run(["--config-file", str(KD_DETR), "--resume", f"train.output_dir={out}", *TINY, "train.max_iter=2"])
    err = capsys.readouterr().err
    line = [x for x in err.splitlines() if x.startswith("error: ")][0]
    assert "model.methods.detrdistill (only in the run's config)" in line
    assert "model.methods.kd_detr (only in the given config)" in line and "--allow-config-change" in line
    assert (out / "config.yaml").read_text() == saved and (out / "metrics.json").read_text() == metrics
    assert not (out / "model_final.pth").exists()
    # the same config resumes
    run(["--config-file", str(DISTILL), "--resume", f"train.output_dir={out}", *TINY, "train.max_iter=2"])
    assert (out / "model_final.pth").is_file()
    # --eval-only of the distilled student: no teacher weights needed, results next to the checkpoint
    run(["--config-file", str(DISTILL), "--eval-only", *TINY, "train.allow_random_teacher=False",
         f"train.init_checkpoint={out / 'model_final.pth'}"])
    assert (out / "eval_model_final" / "coco_instances_results.json").is_file()


@pytest.mark.parametrize("override, words", [
    ("model.methods.detrdistill.weights.class=-0.81", "model.methods.detrdistill.weights.class=-0.81"),
    ("model.methods.detrdistill.weights.l1=1e999", "model.methods.detrdistill.weights.l1=inf"),
    ("model.methods.detrdistill.matcher.cost_class=-1.0", "model.methods.detrdistill.matcher.cost_class=-1.0"),
])
def test_distillation_weights_must_be_finite_and_non_negative(synth, tmp_path, capsys, override, words):
    line = _distill_error(capsys, tmp_path, override)
    assert words in line and "non-negative" in line


@pytest.mark.parametrize("overrides, words", [
    (["model.teacher.transformer.decoder.num_layers=1"], "the student has 2 decoder layers and the teacher 1"),
    (["model.teacher.embed_dim=128", "model.teacher.neck.out_channels=128",
      "model.teacher.transformer.encoder.embed_dim=128", "model.teacher.transformer.decoder.embed_dim=128",
      "model.teacher.position_embedding.num_pos_feats=64"], "widths differ (128 vs 64)"),
])
def test_teacher_that_the_method_cannot_pair(synth, tmp_path, capsys, overrides, words):
    line = _distill_error(capsys, tmp_path, *overrides)
    assert "method 'detrdistill'" in line and words in line


def test_unknown_distillation_term(synth, tmp_path, capsys):
    line = _distill_error(capsys, tmp_path, "+model.methods.detrdistill.weights.clas=1.0")
    assert "unknown terms ['clas']" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_cpu_machine(synth, tmp_path, capsys):
    line = _distill_error(capsys, tmp_path, "train.device=cuda")
    assert "train.device=cpu" in line


def test_teacher_mode_logged_once_when_not_default(synth, tmp_path):
    out = tmp_path / "run"
    run(["--config-file", str(DISTILL), f"train.output_dir={out}", *TINY, "model.teacher_train_mode=True"])
    log = (out / "log.txt").read_text()
    assert log.count("model.teacher_train_mode=True: the teacher follows train()/eval()") == 1
    assert "BatchNorm layers move" in log


def _teacher_file(tmp_path, config, *overrides) -> Path:
    from tprd.config import instantiate
    from tprd.engine.main import load_config

    cfg = load_config(str(config), ["train.device=cpu", *overrides])
    path = tmp_path / "teacher.pth"
    torch.save({"model": instantiate(cfg.model).state_dict()}, path)
    return path


def test_teacher_of_another_detector_is_named(synth, tmp_path, capsys, teacher_init):
    import merge_weight

    dino = _teacher_file(tmp_path, REPO / "projects/dino/configs/dino_r50_synthetic.py")
    assert merge_weight.main(["--input1", str(teacher_init / "r18.pth"), "--input2", str(dino),
                              "--output", str(tmp_path / "init.pth")]) == 0
    line = _distill_error(capsys, tmp_path, f"train.init_checkpoint={tmp_path / 'init.pth'}")
    assert "DINO" in line and "Deformable DETR" in line and "merge_weight.py" in line


def test_teacher_with_another_class_count_is_named(synth, tmp_path, capsys, teacher_init):
    import merge_weight

    other = _teacher_file(tmp_path, TEACHER_CFG, "model.num_classes=8")
    assert merge_weight.main(["--input1", str(teacher_init / "r18.pth"), "--input2", str(other),
                              "--output", str(tmp_path / "init.pth")]) == 0
    line = _distill_error(capsys, tmp_path, f"train.init_checkpoint={tmp_path / 'init.pth'}")
    assert "8 classes" in line and "model.teacher.num_classes" in line


# ------------------------------------------------------------------------------------ merge_weight.py
def _merge(capsys, a, b, out) -> tuple:
    import merge_weight

    try:
        code = merge_weight.main(["--input1", str(a), "--input2", str(b), "--output", str(out)])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr()


def test_merge_weight_refuses_wrong_inputs_and_writes_nothing(tmp_path, capsys, teacher_init):
    r18, teacher = teacher_init / "r18.pth", teacher_init / "teacher" / "model_final.pth"
    out = tmp_path / "init.pth"
    code, io = _merge(capsys, teacher, r18, out)
    assert code == 2 and "swapped" in io.err and "error: " in io.err
    code, io = _merge(capsys, r18, r18, out)
    assert code == 2 and "the same file" in io.err
    sd = torch.load(teacher, weights_only=False)["model"]
    torch.save({"weights": sd}, tmp_path / "odd.pth")
    code, io = _merge(capsys, r18, tmp_path / "odd.pth", out)
    assert code == 2 and "['weights']" in io.err and "model, state_dict, ema, module" in io.err
    code, io = _merge(capsys, r18, tmp_path / "missing.pth", out)
    assert code == 2 and "missing.pth" in io.err
    assert "Traceback" not in io.err and not out.exists()
    # the usual nestings are unwrapped
    torch.save({"ema": {"module": {f"module.{k}": v for k, v in sd.items()}}}, tmp_path / "ema.pth")
    code, io = _merge(capsys, r18, tmp_path / "ema.pth", out)
    assert code == 0 and "unwrapped from ema / module / module. prefix" in io.out and out.is_file()


# ------------------------------------------------------------------------------ tools/check_dataset.py
def _check_dataset(*argv):
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_dataset", REPO / "tools" / "check_dataset.py")
    module = importlib.util.module_from_spec(spec)
    import sys

    sys.modules["check_dataset"] = module  # its worker function is pickled by name
    spec.loader.exec_module(module)
    return module.main(list(argv))


def test_check_dataset_finds_every_problem_at_once(data, capsys):
    from PIL import Image

    ids = []
    _edit(data, "train", lambda d: ids.extend(_corrupt_boxes(d)))
    train_images = sorted(p.name for p in (data / "train").iterdir())
    (data / "train" / train_images[0]).unlink()                      # missing
    (data / "train" / train_images[1]).write_bytes(b"\x89PNG broken")  # does not decode
    good = data / "train" / train_images[2]
    raw = good.read_bytes()
    good.write_bytes(raw[: len(raw) // 2])                           # truncated
    Image.new("RGB", (40, 30)).save(data / "train" / train_images[3])  # another size than the json
    _edit(data, "val", lambda d: d.update(annotations=[]))           # a test split without boxes
    code = _check_dataset("--config-file", str(CUSTOM), "--workers", "2", "--opts", "model.num_classes=3")
    out = capsys.readouterr().out
    assert code == 1
    for words in ("image files missing", train_images[0], "do not decode or are truncated", train_images[1],
                  train_images[2], "size differs", "40x30", "with an image_id not in images",
                  "with zero or negative size", "outside its image", "not four finite numbers",
                  "Class count mismatch", "model.num_classes=5", "my_dataset_val (test)", "no usable annotation"):
        assert words in out, words
    # a clean dataset: exit 0 and nothing to report
    shutil.rmtree(data)


def test_check_dataset_clean_and_parse_error(data, capsys):
    assert _check_dataset("--config-file", str(CUSTOM), "--split", "train", "--workers", "1") == 0
    assert "no problem found" in capsys.readouterr().out
    _json(data, "val").write_text("{ nope")
    assert _check_dataset("--config-file", str(CUSTOM), "--split", "test") == 1
    out = capsys.readouterr().out
    assert "not valid JSON (line 1, column 3" in out


# ------------------------------------------------------------------------------------- the tools
def test_visualize_tprd_reads_the_model_from_the_run_folder(synth, tmp_path):
    import importlib.util
    import sys

    run_dir = tmp_path / "teacher"
    # a model override on the command line: only the run's config.yaml knows it
    run(["--config-file", str(TEACHER_CFG), f"train.output_dir={run_dir}", *TINY, "model.num_queries=12",
         "model.select_box_nums_for_evaluation=12"])
    spec = importlib.util.spec_from_file_location("visualize_tprd", REPO / "tools" / "visualize_tprd.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["visualize_tprd"] = module
    spec.loader.exec_module(module)
    result = module.main(["--run", str(run_dir), "--out", str(tmp_path / "vis"), "--num-images", "1",
                          "--max-images", "2", "--opts", "train.device=cpu"])
    assert result["table"].is_file() and len(result["images"]) == 1


def test_one_override_convention_for_the_tools():
    from tprd.engine.defaults import add_override_arguments, default_argument_parser, override_parser

    p = override_parser()
    p.add_argument("--config-file")
    add_override_arguments(p)
    assert p.parse_args(["--config-file", "c.py", "--opts", "a=1", "b=2"]).opts == ["a=1", "b=2"]
    assert p.parse_args(["--config-file", "c.py", "a=1", "b=2"]).opts == ["a=1", "b=2"]  # as before
    assert default_argument_parser().parse_args(["--config-file", "c.py", "--resume", "--opts", "a=1"]).opts == ["a=1"]
    assert default_argument_parser().parse_args(["--config-file", "c.py", "a=1"]).opts == ["a=1"]


@pytest.mark.parametrize("detector, schedule", [("dino", "4scale_12ep"), ("dab_detr", "50ep")])
def test_walkthrough_chain_for_the_other_detectors(synth, tmp_path, detector, schedule):
    """Train the synthetic teacher (1 iteration), merge it, distil from it: the README's walk with
    the other detectors' files."""
    import torchvision

    import merge_weight

    teacher_cfg = REPO / f"projects/{detector}/configs/{detector}_r50_synthetic.py"
    distill_cfg = REPO / f"projects/{detector}/cfg_distill/DETRDistill_TPRD/{detector}_r50_distill_r18_synthetic.py"
    run(["--config-file", str(teacher_cfg), f"train.output_dir={tmp_path / 'teacher'}", *TINY])
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    assert merge_weight.main(["--input1", str(tmp_path / "r18.pth"), "--input2",
                              str(tmp_path / "teacher" / "model_final.pth"), "--output", str(tmp_path / "init.pth")]) == 0
    out = tmp_path / "distill"
    run(["--config-file", str(distill_cfg), f"train.output_dir={out}", *TINY,
         f"train.init_checkpoint={tmp_path / 'init.pth'}", "train.allow_random_teacher=False"])
    log = (out / "log.txt").read_text()
    assert "teacher complete" in log and (out / "coco_instances_results.json").is_file()


def test_a_real_bug_keeps_its_traceback(data, tmp_path, monkeypatch):
    import tprd.engine.main as engine_main

    def broken(cfg):
        raise ZeroDivisionError("a bug, not the user's mistake")

    monkeypatch.setattr(engine_main, "build_model", broken)
    with pytest.raises(ZeroDivisionError):
        _run(tmp_path)


def test_user_error_found_behind_the_config_wrapper():
    from tprd.config import InstantiationError
    from tprd.engine.defaults import find_user_error
    from tprd.errors import DatasetError

    cause = DatasetError("the user's file")
    try:
        try:
            raise cause
        except DatasetError as e:
            raise InstantiationError("Error instantiating x", path="dataloader.train") from e
    except InstantiationError as wrapped:
        assert find_user_error(wrapped) is cause
    assert find_user_error(InstantiationError("bug inside a target")) is None
    assert find_user_error(InstantiationError("no such _target_", user_error=True)) is not None
    assert find_user_error(KeyError("x")) is None
