"""The after-training tools, each through its command line, on the synthetic data at tiny sizes.

* ``tools/extract_student.py``: the student of a Deformable DETR distillation checkpoint, in detrex
  naming, loads strictly through ``load_detrex_checkpoint`` into the student config and gives the
  distiller's detections exactly; the inverse key conversion gives every official detrex key list
  exactly; reference-format input; checkpoints without a student are a clear error.
* ``demo/demo.py``: writes decodable images, of the input's size, with something drawn.
* ``tools/visualize_json_results.py``, ``tools/visualize_data.py``: images written.
* ``tools/plot_metrics.py``: a valid PNG; an unknown key names the keys there are.
* ``tools/analyze_model.py``: parameter counts equal the model's own; the deformable-attention
  FLOPs equal the count rule by hand.
* ``tools/export_onnx.py``: onnxruntime on the CPU agrees with PyTorch (batch 1 and 2).
"""
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import DETREX_KEYS_DIR, REPO
from tprd.checkpoint import load_detrex_checkpoint
from tprd.config import LazyConfig, instantiate
from tprd.data.synthetic import generate_synthetic_dataset
from tprd.engine.main import load_config
from tprd.engine.predictor import TensorDetector, build_detector
from tprd.checkpoint.detrex import adapter_for

DISTILL = str(REPO / "projects/deformable_detr/cfg_distill/DETRDistill_TPRD/deformable_detr_r50_distill_r18_synthetic.py")
DETECTOR = str(REPO / "projects/deformable_detr/configs/deformable_detr_r18_synthetic.py")


def tool(relpath):
    """The ``main(argv)`` of a script under the repository (tools/ and demo/ are not packages)."""
    spec = importlib.util.spec_from_file_location(Path(relpath).stem, REPO / relpath)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def run_script(relpath, *argv, env=None):
    """The script in a fresh interpreter from the repository root (this checkout's ``tprd`` first)."""
    env = dict(env or os.environ)
    env["PYTHONPATH"] = str(REPO)
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, relpath, *argv], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    generate_synthetic_dataset(root / "synthetic", num_train=4, num_val=2, seed=3)
    return root


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """A distillation checkpoint of the synthetic Deformable DETR R50 -> R18 config (weights
    perturbed away from the initialisation, so that detections differ between queries), and the
    Distiller it came from, in eval mode."""
    torch.manual_seed(0)
    distiller = instantiate(load_config(DISTILL).model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in distiller.student.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    path = tmp_path_factory.mktemp("distill") / "model_final.pth"
    torch.save({"model": distiller.state_dict(), "iteration": 19}, path)
    return path, distiller.eval()


def val_inputs(datasets, n=2):
    from tprd.engine.predictor import Predictor

    cfg = load_config(DISTILL)
    files = sorted((datasets / "synthetic" / "val").glob("*.jpg"))[:n]
    return [Predictor(cfg, torch.nn.Identity()).prepare(str(f)) for f in files]


# --------------------------------------------------------------------------------------------
# extract_student
# --------------------------------------------------------------------------------------------
def test_extracted_detrex_student_loads_strictly_and_detects_as_in_the_distiller(distilled, datasets, tmp_path,
                                                                                 capsys):
    path, distiller = distilled
    out = tmp_path / "student_detrex.pth"
    assert tool("tools/extract_student.py")(["--input", str(path), "--output", str(out), "--format", "detrex"]) == 0
    printed = capsys.readouterr().out
    saved = torch.load(out, weights_only=False)["model"]
    assert not any(k.startswith(("student.", "teacher.")) for k in saved)
    # detrex names: detectron2 ResNet, detrex layer names, the shared heads under every stage index
    assert "backbone.res2.0.conv1.weight" in saved and "backbone.stem.conv1.weight" in saved
    assert "transformer.encoder.layers.0.attentions.0.sampling_offsets.weight" in saved
    assert f"{len(saved)} keys" in printed

    student = build_detector(load_config(DISTILL), device="cpu")
    report = load_detrex_checkpoint(student, str(out), strict=True)
    assert report.ok and len(report.matched) == len(student.state_dict())
    ref = distiller.student.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in student.state_dict().items())

    inputs = val_inputs(datasets)
    with torch.no_grad():
        expected, got = distiller(inputs), student.eval()(inputs)
    for e, g in zip(expected, got):
        assert e["scores"].numel() > 0 and e["scores"].unique().numel() > 1
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(e[key], g[key]), key


@pytest.mark.parametrize("name,config,overrides", [
    ("deformable_detr_r18_student", "projects/deformable_detr/configs/models/deformable_detr_r18.py", []),
    ("deformable_detr_r50_box_refine", "projects/deformable_detr/configs/models/deformable_detr_r50.py",
     ["model.with_box_refine=True"]),
    ("deformable_detr_r50_two_stage", "projects/deformable_detr/configs/models/deformable_detr_r50.py",
     ["model.with_box_refine=True", "model.as_two_stage=True"]),
    ("dab_detr_r18_student", "projects/dab_detr/configs/models/dab_detr_r18.py", []),
    ("dino_r18_student", "projects/dino/configs/models/dino_r18.py", []),
])
def test_detrex_naming_gives_the_official_key_list(name, config, overrides):
    """Our weights in detrex naming have exactly the keys and shapes of the real detrex model
    (aliases of shared tensors included), and convert back to exactly our tensors."""
    from tprd.checkpoint.student import student_to_detrex

    keys_file = DETREX_KEYS_DIR / f"{name}.json"
    if not keys_file.is_file():
        pytest.fail(f"detrex key list not found at {keys_file}; set TPRD_REFERENCE_DIR")
    cfg = LazyConfig.load(str(REPO / config))
    cfg = LazyConfig.apply_overrides(cfg, overrides + (["model.device=cpu"] if "device" in cfg.model else []))
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    ours = model.state_dict()
    detrex = student_to_detrex(type(model), ours)  # checks the round trip itself
    official = {k: tuple(shape) for k, shape, _ in json.loads(keys_file.read_text())}
    assert set(detrex) == set(official)
    assert all(tuple(detrex[k].shape) == official[k] for k in official)
    back = adapter_for(model).to_ours(detrex)
    assert set(back) == set(ours) and all(torch.equal(back[k], ours[k]) for k in ours)


def test_extract_from_a_reference_format_checkpoint(distilled, tmp_path):
    """The reference code's flat ``student.*``/``teacher.*`` file in detrex naming -> our naming."""
    from tprd.modeling.deformable_detr import DeformableDETR

    path, distiller = distilled
    flat = {}
    for part in ("student", "teacher"):
        sub = getattr(distiller, part).state_dict()
        flat.update({f"{part}.{k}": v for k, v in adapter_for(DeformableDETR).to_detrex(sub).items()})
    ref_file = tmp_path / "reference.pth"
    torch.save(flat, ref_file)
    out = tmp_path / "student.pth"
    assert tool("tools/extract_student.py")(["--input", str(ref_file), "--output", str(out)]) == 0
    saved = torch.load(out, weights_only=False)["model"]
    ref = distiller.student.state_dict()
    assert set(saved) == set(ref) and all(torch.equal(saved[k], ref[k]) for k in ref)


def test_extract_student_errors_name_the_file_and_the_fix(tmp_path):
    plain = tmp_path / "detector.pth"
    torch.save({"model": {"backbone.conv1.weight": torch.zeros(1)}}, plain)
    res = run_script("tools/extract_student.py", "--input", str(plain), "--output", str(tmp_path / "o.pth"))
    assert res.returncode == 2
    assert str(plain) in res.stderr and "holds no student" in res.stderr and "distillation checkpoint" in res.stderr
    assert not (tmp_path / "o.pth").exists()
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match=re.escape(str(text))):
        tool("tools/extract_student.py")(["--input", str(text), "--output", str(tmp_path / "o.pth")])
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing)) + ".*does not exist"):
        tool("tools/extract_student.py")(["--input", str(missing), "--output", str(tmp_path / "o.pth")])


# --------------------------------------------------------------------------------------------
# demo, visualisers
# --------------------------------------------------------------------------------------------
def test_demo_draws_the_students_detections(distilled, datasets, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(datasets))
    path, _ = distilled
    val = datasets / "synthetic" / "val"
    out = tmp_path / "demo"
    argv = ["--config-file", DISTILL, "--input", str(val), "--output", str(out), "--confidence-threshold", "0.0",
            "--opts", f"train.init_checkpoint={path}", "train.device=cpu"]
    assert tool("demo/demo.py")(argv) == 0
    printed = capsys.readouterr().out
    inputs = sorted(val.glob("*.jpg"))
    assert sorted(p.name for p in out.iterdir()) == [p.name for p in inputs]
    for src in inputs:
        a = np.asarray(Image.open(src).convert("RGB"), dtype=np.int16)
        b = np.asarray(Image.open(out / src.name).convert("RGB"), dtype=np.int16)
        assert a.shape == b.shape
        assert np.abs(a - b).max() > 100  # boxes and labels drawn, not only re-encoding noise
        assert re.search(rf"{re.escape(src.name)}: \d+ detections in [0-9.]+ ms", printed)
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        tool("demo/demo.py")(["--config-file", DISTILL, "--input", str(val / "missing.jpg"), "--output", str(out)])


def test_visualize_json_results_and_data(datasets, tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(datasets))
    ann = json.loads((datasets / "synthetic" / "annotations" / "instances_val.json").read_text())
    preds = [{"image_id": a["image_id"], "category_id": a["category_id"], "score": 0.9,
              "bbox": [a["bbox"][0] + 2, a["bbox"][1] + 2, a["bbox"][2], a["bbox"][3]]} for a in ann["annotations"]]
    results = tmp_path / "coco_instances_results.json"
    results.write_text(json.dumps(preds))
    out = tmp_path / "vis"
    argv = ["--input", str(results), "--output", str(out), "--dataset", "synthetic_val"]
    assert tool("tools/visualize_json_results.py")(argv) == 0
    images = {im["file_name"]: im for im in ann["images"]}
    assert sorted(p.name for p in out.iterdir()) == sorted(images)
    for name, im in images.items():
        assert Image.open(out / name).size == (2 * im["width"] + 4, im["height"])  # predictions | GT
    with pytest.raises(ValueError, match="--dataset"):
        tool("tools/visualize_json_results.py")(["--input", str(results), "--output", str(out),
                                                 "--dataset", "synthetic_train"])

    data_out = tmp_path / "data"
    argv = ["--config-file", DETECTOR, "--output-dir", str(data_out), "--num-images", "3"]
    assert tool("tools/visualize_data.py")(argv) == 0
    written = sorted(data_out.iterdir())
    assert len(written) == 3
    for p in written:
        assert Image.open(p).convert("RGB").size[0] > 0


# --------------------------------------------------------------------------------------------
# plot_metrics
# --------------------------------------------------------------------------------------------
def test_plot_metrics_writes_a_png(tmp_path):
    runs = []
    for name, scale in (("kd_detr", 1.0), ("kd_detr_tprd", 0.8)):
        run = tmp_path / name
        run.mkdir()
        lines = []
        for it in range(30):
            record = {"iteration": it, "total_loss": scale * (2.0 - it / 30)}
            if it in (14, 29):
                record["bbox/AP"] = it / scale
            lines.append(json.dumps(record))
        (run / "metrics.json").write_text("\n".join(lines) + "\n")
        runs.append(str(run))
    out = tmp_path / "plots" / "curves.png"
    assert tool("tools/plot_metrics.py")([*runs, "--out", str(out), "--keys", "total_loss", "bbox/AP"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out) as im:
        im.verify()
    with pytest.raises(KeyError, match="total_loss"):
        tool("tools/plot_metrics.py")([*runs, "--out", str(out), "--keys", "loss_nope"])
    with pytest.raises(FileNotFoundError, match="metrics.json"):
        tool("tools/plot_metrics.py")([str(tmp_path / "no_run"), "--out", str(out)])


def test_plot_metrics_moving_average_by_hand():
    spec = importlib.util.spec_from_file_location("plot_metrics", REPO / "tools/plot_metrics.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]


# --------------------------------------------------------------------------------------------
# analyze_model
# --------------------------------------------------------------------------------------------
def test_analyze_model_counts(capsys):
    argv = ["--config-file", DISTILL, "--tasks", "parameter", "flop", "speed", "--height", "64", "--width", "96",
            "--num-iters", "1", "--warmup", "1", "--max-depth", "1"]
    assert tool("tools/analyze_model.py")(argv) == 0
    printed = capsys.readouterr().out
    cfg = load_config(DISTILL)
    for part in ("student", "teacher"):
        model = build_detector(cfg, part, device="cpu")
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert f"parameters: {part} {total} total, {trainable} trainable" in printed
        # count rule: 4 multiply-adds per channel per bilinear sample, for every query, head, level,
        # point. 64x96 input, levels at strides 8, 16, 32, 64: 8x12 + 4x6 + 2x3 + 1x2 = 128 tokens
        # (1 encoder layer); 30 queries (2 decoder layers); width 64, 4 heads, 4 levels, 4 points.
        samples = (1 * 128 + 2 * 30) * 4 * 4 * 4
        m = re.search(rf"flops: {part} (\d+) total.*deformable-attention sampling (\d+)", printed)
        assert m and int(m.group(2)) == 4 * samples * (64 // 4)
        assert re.search(rf"speed: {part} [0-9.]+ images/s on cpu \(batch 1, 64x96", printed)


# --------------------------------------------------------------------------------------------
# ONNX export
# --------------------------------------------------------------------------------------------
def test_onnx_export_matches_pytorch(distilled, tmp_path):
    pytest.importorskip("onnx", reason="the export extra is not installed: pip install -e \".[export]\"")
    ort = pytest.importorskip("onnxruntime", reason="the export extra is not installed: pip install -e \".[export]\"")
    path, distiller = distilled
    out = tmp_path / "student.onnx"
    argv = ["--config-file", DISTILL, "--checkpoint", str(path), "--output", str(out), "--height", "64",
            "--width", "96"]
    assert tool("tools/export_onnx.py")(argv) == 0
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    reference = TensorDetector(distiller.student)
    g = torch.Generator().manual_seed(5)
    for batch in (1, 2):  # the batch axis is dynamic
        images = torch.rand(batch, 3, 64, 96, generator=g) * 255
        scores, boxes = session.run(None, {"images": images.numpy()})
        with torch.no_grad():
            ref_scores, ref_boxes = reference(images)
        assert scores.shape == tuple(ref_scores.shape) and boxes.shape == tuple(ref_boxes.shape)
        torch.testing.assert_close(torch.from_numpy(scores), ref_scores, rtol=0, atol=1e-5)
        torch.testing.assert_close(torch.from_numpy(boxes), ref_boxes, rtol=0, atol=1e-3)  # pixels


def test_flop_rule_is_the_same_for_a_custom_deformable_attention_function():
    """A deformable-attention kernel run as a custom autograd Function (an op fvcore does not
    know) is counted with the same rule as the grid_sample path."""
    from tprd.layers import ms_deform_attn as msda

    spec = importlib.util.spec_from_file_location("analyze_model", REPO / "tools/analyze_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    class MSDAFunctionForTest(torch.autograd.Function):
        @staticmethod
        def forward(ctx, value, shapes, starts, locations, weights):
            return msda.msda_pytorch(value, shapes, starts, locations, weights)

    torch.manual_seed(0)
    detector = build_detector(load_config(DETECTOR, ["model.num_queries=10", "model.select_box_nums_for_evaluation=10"]),
                              device="cpu")
    images = torch.rand(1, 3, 64, 96) * 255

    def sampling_flops():
        by_op = module.count_flops(detector, images).by_operator()
        return sum(v for k, v in by_op.items() if k == "grid_sampler" or module.is_msda_op(k)), by_op

    reference, _ = sampling_flops()
    msda.register_msda_backend("function_for_test", lambda *a: MSDAFunctionForTest.apply(*a), cuda_only=False)
    previous = msda.get_msda_backend()
    msda.set_msda_backend("function_for_test")
    try:
        custom, by_op = sampling_flops()
    finally:
        msda.set_msda_backend(previous)
        msda._BACKENDS.pop("function_for_test")
    assert "grid_sampler" not in by_op and any(module.is_msda_op(k) for k in by_op)
    # 2 encoder layers over 128 tokens, 2 decoder layers of 10 queries; 4 heads of 32 channels
    assert custom == reference == 4 * (2 * 128 + 2 * 10) * 4 * 4 * 4 * 32
