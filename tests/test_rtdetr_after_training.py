"""After-training tools on RT-DETRv2 (docs/rt_detr.md#after-training), on a tiny distiller.

* ``tools/extract_student.py`` writes the official RT-DETRv2 layout: ``model`` (the trained student)
  and ``ema/module`` (the student with the averages, as ``ModelEMA.applied`` evaluates it), each
  with every key of the student (``num_batches_tracked``, ``anchors``, ``valid_mask``,
  ``num_points_scale`` included); both load strictly, as the reference's loaders do it and through
  ``load_rtdetr_checkpoint``, and predict exactly as the distiller's student;
* at full size the file has exactly the keys and shapes of the official RT-DETRv2-S key list, and
  loads strictly into the L -> S COCO config's student;
* ``--eval-spatial-size`` writes the anchors of another input size;
* ``ModelEMA`` loads the file's ``ema`` entry (the reference's layout);
* ``tools/export_onnx.py``: onnxruntime agrees with PyTorch on the extracted student, with the
  default (``grid_sample``) and the discrete sampling (no ``GridSample`` node); the traced function
  pads a size that is not a multiple of 32 as the detector does.
"""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from conftest import REPO, RTDETR_KEYS_DIR
from tprd.checkpoint import CheckpointMismatchError, load_rtdetr_checkpoint
from tprd.config import instantiate
from tprd.engine.ema import ModelEMA
from tprd.engine.main import load_config
from tprd.engine.predictor import TensorDetector, build_detector

DISTILL = str(REPO / "projects/rt_detr/cfg_distill/KD_DETR/rtdetrv2_r50vd_distill_r18vd_synthetic.py")
COCO_DISTILL = str(REPO / "projects/rt_detr/cfg_distill/KD_DETR/rtdetrv2_r50vd_distill_r18vd_coco.py")
# the synthetic pair with an R18 teacher (the tool ignores the teacher; a smaller file) and a student
# whose anchors are cached for 64x96 (as the official models' for 640x640)
SIZE = [64, 96]
OVERRIDES = ["model.teacher.backbone.depth=18", "model.teacher.encoder.in_channels=[128,256,512]",
             f"model.student.encoder.eval_spatial_size={SIZE}", f"model.student.decoder.eval_spatial_size={SIZE}"]
STUDENT_OPTS = ["--opts", *OVERRIDES]
DTYPES = {"float32": torch.float32, "int64": torch.int64, "bool": torch.bool}


def tool(relpath):
    spec = importlib.util.spec_from_file_location(Path(relpath).stem, REPO / relpath)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def fresh_student(overrides=OVERRIDES):
    torch.manual_seed(123)  # other random weights than the distiller's
    return build_detector(load_config(DISTILL, overrides), "student", device="cpu")


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """A distillation checkpoint with an EMA whose averages differ from the trained weights, the
    expected student weights (trained / averaged, the latter from ``ModelEMA.applied``) and images."""
    torch.manual_seed(0)
    distiller = instantiate(load_config(DISTILL, OVERRIDES).model)
    g = torch.Generator().manual_seed(1)

    def perturb():  # spread the class logits: the top-k query selection has no near ties
        with torch.no_grad():
            for p in distiller.student.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)

    perturb()
    ema = ModelEMA(distiller, decay=0.5, warmups=3)
    perturb()
    ema.update()
    perturb()
    distiller.eval()
    trained = {k: v.clone() for k, v in distiller.student.state_dict().items()}
    with ema.applied():
        averaged = {k: v.clone() for k, v in distiller.student.state_dict().items()}
    path = tmp_path_factory.mktemp("rtdetr_distill") / "model_final.pth"
    torch.save({"model": distiller.state_dict(), "ema": ema.state_dict(), "iteration": 7}, path)
    images = torch.rand(2, 3, *SIZE, generator=g) * 255
    return path, trained, averaged, ema.updates, images


@pytest.fixture(scope="module")
def extracted(distilled, tmp_path_factory):
    path = distilled[0]
    out = tmp_path_factory.mktemp("rtdetr_student") / "student.pth"
    assert tool("tools/extract_student.py")(["--input", str(path), "--output", str(out)]) == 0
    return out


def predictions(model, images):
    with torch.no_grad():
        return TensorDetector(model)(images)


def test_extracted_student_has_the_official_layout_and_both_weights(distilled, extracted):
    _, trained, averaged, updates, _ = distilled
    ckpt = torch.load(extracted, map_location="cpu", weights_only=False)
    assert set(ckpt) == {"model", "ema"} and set(ckpt["ema"]) == {"module", "updates"}
    assert ckpt["ema"]["updates"] == updates == 1
    keys = set(fresh_student().state_dict())  # the official naming is the model's own
    for nested, expected in ((ckpt["model"], trained), (ckpt["ema"]["module"], averaged)):
        assert set(nested) == keys == set(expected)
        assert all(torch.equal(nested[k], expected[k]) for k in keys)
    for leaf in ("decoder.anchors", "decoder.valid_mask", "decoder.decoder.layers.0.cross_attn.num_points_scale",
                 "backbone.conv1.conv1_1.norm.num_batches_tracked"):
        assert leaf in keys
    # the averages differ from the trained weights, the constant / integer entries do not
    assert not torch.equal(ckpt["model"]["decoder.dec_score_head.0.weight"],
                           ckpt["ema"]["module"]["decoder.dec_score_head.0.weight"])
    assert torch.equal(ckpt["model"]["decoder.anchors"], ckpt["ema"]["module"]["decoder.anchors"])


def test_extracted_student_loads_as_the_reference_loads_it(distilled, extracted):
    """The reference's inference / --tuning rule (``ema/module`` if present, else ``model``) and its
    --resume (``model`` and ``ema/module`` strictly), here with ``nn.Module.load_state_dict``, and
    our ``load_rtdetr_checkpoint``: strict, and the student's predictions exactly."""
    _, trained, averaged, _, images = distilled
    ckpt = torch.load(extracted, map_location="cpu", weights_only=False)
    model = fresh_student()
    reference = {}
    for name, weights in (("trained", trained), ("averaged", averaged)):
        model.load_state_dict(weights)
        reference[name] = predictions(model, images)
    assert reference["trained"][0].shape == (2, 30, 5)
    assert not torch.equal(reference["trained"][0], reference["averaged"][0])

    # every load is strict (all entries replaced), and each differs from the previous one's weights
    loads = [
        ("reference inference / --tuning", "averaged",
         lambda: model.load_state_dict(ckpt["ema"]["module"] if "ema" in ckpt else ckpt["model"], strict=True)),
        ("reference --resume: model", "trained", lambda: model.load_state_dict(ckpt["model"], strict=True)),
        ("reference --resume: ema", "averaged", lambda: model.load_state_dict(ckpt["ema"]["module"], strict=True)),
        ("load_rtdetr_checkpoint, model", "trained",
         lambda: load_rtdetr_checkpoint(model, {"model": ckpt["model"]}, strict=True)),
        ("load_rtdetr_checkpoint, file", "averaged", lambda: load_rtdetr_checkpoint(model, str(extracted), strict=True)),
    ]
    for name, which, load in loads:
        load()
        got = predictions(model, images)
        assert all(torch.equal(a, b) for a, b in zip(got, reference[which])), name
    report = load_rtdetr_checkpoint(model, str(extracted), strict=True)
    assert report.ok and len(report.matched) == len(ckpt["model"])


def test_model_ema_loads_the_reference_layout(distilled, extracted):
    _, trained, averaged, updates, _ = distilled
    ckpt = torch.load(extracted, map_location="cpu", weights_only=False)
    model = fresh_student()
    model.load_state_dict(ckpt["model"])
    ema = ModelEMA(model, warmups=3)
    ema.load_state_dict(ckpt["ema"])
    assert ema.loaded and ema.updates == updates
    with ema.applied():
        assert all(torch.equal(v, averaged[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())


def test_ema_and_plain_layouts(distilled, tmp_path):
    """``--ema``: the averages under both entries; ``--format tprd``: ``{"model": trained}``; without
    an EMA in the checkpoint: ``model`` only."""
    path, trained, averaged, _, _ = distilled
    extract = tool("tools/extract_student.py")
    assert extract(["--input", str(path), "--output", str(tmp_path / "ema.pth"), "--ema"]) == 0
    ckpt = torch.load(tmp_path / "ema.pth", weights_only=False)
    for nested in (ckpt["model"], ckpt["ema"]["module"]):
        assert all(torch.equal(nested[k], averaged[k]) for k in averaged)
    assert extract(["--input", str(path), "--output", str(tmp_path / "tprd.pth"), "--format", "tprd"]) == 0
    ckpt = torch.load(tmp_path / "tprd.pth", weights_only=False)
    assert set(ckpt) == {"model"} and all(torch.equal(ckpt["model"][k], trained[k]) for k in trained)

    no_ema = tmp_path / "no_ema.pth"
    torch.save({"model": torch.load(path, weights_only=False)["model"]}, no_ema)
    assert extract(["--input", str(no_ema), "--output", str(tmp_path / "plain.pth")]) == 0
    assert set(torch.load(tmp_path / "plain.pth", weights_only=False)) == {"model"}
    with pytest.raises(KeyError, match="no 'ema' entry.*extract without --ema"):
        extract(["--input", str(no_ema), "--output", str(tmp_path / "x.pth"), "--ema"])
    with pytest.raises(ValueError, match="--eval-spatial-size needs --config-file"):
        extract(["--input", str(path), "--output", str(tmp_path / "x.pth"), "--eval-spatial-size", "64", "96"])


def test_eval_spatial_size_writes_the_anchors_of_that_size(distilled, tmp_path, capsys):
    path, trained, averaged, _, _ = distilled
    out = tmp_path / "student_96x128.pth"
    argv = ["--input", str(path), "--output", str(out), "--config-file", DISTILL, "--eval-spatial-size", "96", "128",
            *STUDENT_OPTS]
    assert tool("tools/extract_student.py")(argv) == 0
    assert "loads strictly into RTDETR" in capsys.readouterr().out
    ckpt = torch.load(out, weights_only=False)
    other = fresh_student(OVERRIDES[:2] + ["model.student.encoder.eval_spatial_size=[96,128]"])
    # strides 8/16/32 of 96x128: 12x16 + 6x8 + 3x4 tokens
    assert other.decoder.anchors.shape == (1, 252, 4)
    for nested, expected in ((ckpt["model"], trained), (ckpt["ema"]["module"], averaged)):
        assert set(nested) == set(expected)
        assert torch.equal(nested["decoder.anchors"], other.decoder.anchors)
        assert torch.equal(nested["decoder.valid_mask"], other.decoder.valid_mask)
        assert all(torch.equal(nested[k], v) for k, v in expected.items()
                   if k not in ("decoder.anchors", "decoder.valid_mask"))
    assert load_rtdetr_checkpoint(other, str(out), strict=True).ok
    with pytest.raises(CheckpointMismatchError, match="eval_spatial_size"):
        load_rtdetr_checkpoint(fresh_student(), str(out), strict=True)  # built for 64x96


def filled(entries, value, prefix=""):
    """``{prefix + key: tensor}``, every tensor a one-element storage broadcast to its shape."""
    out = {}
    for key, shape, dtype in entries:
        one = torch.full((1,) * len(shape) if shape else (), value).to(DTYPES[dtype])
        out[prefix + key] = one.expand(shape) if shape else one
    return out


def test_full_size_student_has_the_official_key_list(tmp_path):
    """A made-up L -> S distillation checkpoint with the official keys (and an EMA of the student's
    floating-point entries): the extracted student has exactly the keys and shapes of
    ``rtdetrv2_r18vd_120e_coco`` in both entries, which load strictly into the COCO config's student."""
    student = json.loads((RTDETR_KEYS_DIR / "rtdetrv2_r18vd_120e_coco.json").read_text())
    teacher = json.loads((RTDETR_KEYS_DIR / "rtdetrv2_r50vd_6x_coco.json").read_text())
    floats = [e for e in student if e[2] == "float32" and not e[0].endswith(("anchors", "num_points_scale"))]
    ckpt = {"model": {**filled(student, 1.0, "student."), **filled(teacher, 5.0, "teacher.")},
            "ema": {**filled(floats, 2.0, "student."), "_ema_updates": torch.tensor(40)}}
    path = tmp_path / "distill.pth"
    torch.save(ckpt, path)
    out = tmp_path / "student.pth"
    assert tool("tools/extract_student.py")(["--input", str(path), "--output", str(out)]) == 0
    saved = torch.load(out, weights_only=False)
    official = {k: tuple(shape) for k, shape, _ in student}
    assert saved["ema"]["updates"] == 40
    for nested, value in ((saved["model"], 1.0), (saved["ema"]["module"], 2.0)):
        assert {k: tuple(v.shape) for k, v in nested.items()} == official
        assert float(nested["decoder.dec_score_head.2.weight"].flatten()[0]) == value
        assert int(nested["backbone.conv1.conv1_1.norm.num_batches_tracked"]) == 1  # not averaged
    model = build_detector(load_config(COCO_DISTILL), "student", device="cpu")
    for nested in ({"model": saved["model"]}, saved):  # model, then ema/module
        assert load_rtdetr_checkpoint(model, nested, strict=True).ok


def test_onnx_export_of_the_extracted_student(distilled, extracted, tmp_path, capsys):
    pytest.importorskip("onnx", reason="the export extra is not installed: pip install -e \".[export]\"")
    ort = pytest.importorskip("onnxruntime", reason="the export extra is not installed: pip install -e \".[export]\"")
    import onnx

    _, _, averaged, _, images = distilled
    reference = fresh_student()
    reference.load_state_dict(averaged)  # the file's ema/module comes first
    discrete = fresh_student(OVERRIDES + ["model.student.decoder.cross_attn_method=discrete"])
    discrete.load_state_dict(averaged)
    for method, model in (("default", reference), ("discrete", discrete)):
        out = tmp_path / f"student_{method}.onnx"
        argv = ["--config-file", DISTILL, "--checkpoint", str(extracted), "--output", str(out),
                "--cross-attn-method", method, *STUDENT_OPTS]  # the size: the student's eval_spatial_size
        assert tool("tools/export_onnx.py")(argv) == 0
        assert f"[batch,3,{SIZE[0]},{SIZE[1]}]" in capsys.readouterr().out
        ops = {n.op_type for n in onnx.load(str(out)).graph.node}
        assert ("GridSample" in ops) == (method == "default")
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        for batch in (images[:1], images):  # the batch axis is dynamic
            scores, boxes = session.run(None, {"images": batch.numpy()})
            ref_scores, ref_boxes = predictions(model, batch)
            assert scores.shape == tuple(ref_scores.shape) and boxes.shape == tuple(ref_boxes.shape)
            torch.testing.assert_close(torch.from_numpy(scores), ref_scores, rtol=0, atol=1e-5)
            torch.testing.assert_close(torch.from_numpy(boxes), ref_boxes, rtol=0, atol=1e-3)  # pixels


def test_tensor_detector_pads_as_the_detector_does(distilled):
    """At a size that is not a multiple of 32 the traced function pads as ``RTDETR.forward`` does:
    its top detections (over queries x classes) are the detector's, boxes in pixels of the input."""
    _, trained, _, _, images = distilled
    model = fresh_student()
    model.load_state_dict(trained)
    x = images[:, :, :60, :90]
    scores, boxes = predictions(model, x)
    with torch.no_grad():
        dets = model([{"image": im, "height": 60, "width": 90} for im in x])
    for s, b, d in zip(scores, boxes, dets):
        top, index = s.flatten().topk(d["scores"].numel())
        torch.testing.assert_close(top, d["scores"], rtol=0, atol=1e-6)
        assert torch.equal(index % s.shape[1], d["labels"])
        torch.testing.assert_close(b[index // s.shape[1]], d["boxes"], rtol=0, atol=1e-4)


def test_read_rtdetr_checkpoint_of_each_layout():
    """Official ``ema/module`` first; our own training checkpoints (``"ema"``: averaged tensors by
    name) give ``model``; an ``ema`` without ``module`` and no ``model`` is an error."""
    from tprd.checkpoint import read_rtdetr_checkpoint
    from tprd.checkpoint.files import CheckpointFileError

    trained, averaged = {"decoder.w": torch.zeros(2)}, {"decoder.w": torch.ones(2)}
    assert torch.equal(read_rtdetr_checkpoint({"model": trained, "ema": {"module": averaged}})["decoder.w"],
                       averaged["decoder.w"])
    ours = {"model": trained, "ema": {"decoder.w": torch.ones(2), "_ema_updates": torch.tensor(3)}}
    assert torch.equal(read_rtdetr_checkpoint(ours)["decoder.w"], trained["decoder.w"])
    with pytest.raises(CheckpointFileError, match="'ema' has no 'module'.*no 'model' entry"):
        read_rtdetr_checkpoint({"ema": {"decoder.w": torch.ones(2)}})
