"""Tests of the COCO and Pascal VOC evaluators and the inference loop."""
from __future__ import annotations

import contextlib
import io
import json
import multiprocessing as mp
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from tprd.data import DatasetCatalog, MetadataCatalog, get_detection_dataset, register_coco_instances
from tprd.data.catalog import register_pascal_voc
from tprd.data.synthetic import generate_synthetic_dataset
from tprd.evaluation import (
    COCOEvaluator,
    DatasetEvaluator,
    DatasetEvaluators,
    PascalVOCDetectionEvaluator,
    inference_on_dataset,
)


@pytest.fixture(scope="module")
def synth_datasets(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("datasets")
    generate_synthetic_dataset(root / "synthetic", num_train=4, num_val=4, seed=2)
    return root


@pytest.fixture
def env(monkeypatch, synth_datasets) -> Path:
    monkeypatch.setenv("DETECTRON2_DATASETS", str(synth_datasets))
    return synth_datasets


@pytest.fixture
def cleanup():
    names = []
    yield names
    for n in names:
        DatasetCatalog.remove(n)
        MetadataCatalog.remove(n)


def _perfect(records):
    return [
        {"boxes": torch.as_tensor(r["boxes"]), "scores": torch.ones(len(r["boxes"])), "labels": torch.as_tensor(r["classes"])}
        for r in records
    ]


# --------------------------------------------------------------------------------------------
# COCO
# --------------------------------------------------------------------------------------------
CAT_IDS = [4, 9, 17]  # non-contiguous on purpose; labels 0, 1, 2


def _coco_gt(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    images, anns = [], []
    for img in range(1, 6):
        images.append({"id": img * 10, "file_name": f"{img}.jpg", "height": 120, "width": 160})
        for k in range(int(rng.integers(1, 5))):
            x, y = rng.uniform(0, 100, 2)
            w, h = rng.uniform(4, 60, 2)
            anns.append({"id": len(anns) + 1, "image_id": img * 10, "category_id": int(rng.choice(CAT_IDS)),
                         "bbox": [float(x), float(y), float(w), float(h)], "area": float(w * h),
                         "iscrowd": int(k == 3)})
    gt = {"images": images, "annotations": anns,
          "categories": [{"id": c, "name": f"class{c}"} for c in CAT_IDS]}
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    return path


def _noisy_predictions(gt: dict, seed: int):
    """Per image: jittered copies of the GT boxes (some with a wrong class) plus random boxes."""
    rng = np.random.default_rng(seed)
    label_of = {c: i for i, c in enumerate(CAT_IDS)}
    preds = {}
    for im in gt["images"]:
        anns = [a for a in gt["annotations"] if a["image_id"] == im["id"]]
        boxes, labels = [], []
        for a in anns:
            x, y, w, h = a["bbox"]
            jit = rng.normal(0, 3, 4)
            boxes.append([x + jit[0], y + jit[1], x + w + jit[2], y + h + jit[3]])
            labels.append(label_of[a["category_id"]] if rng.random() < 0.8 else int(rng.integers(0, 3)))
        for _ in range(3):
            x, y = rng.uniform(0, 120, 2)
            boxes.append([x, y, x + rng.uniform(5, 40), y + rng.uniform(5, 40)])
            labels.append(int(rng.integers(0, 3)))
        preds[im["id"]] = {"boxes": torch.tensor(boxes, dtype=torch.float32),
                           "scores": torch.tensor(rng.uniform(0.05, 1, len(boxes)), dtype=torch.float32),
                           "labels": torch.tensor(labels)}
    return preds


def test_coco_evaluator_equals_pycocotools(tmp_path, cleanup):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    json_file = _coco_gt(tmp_path)
    gt = json.loads(json_file.read_text())
    register_coco_instances("tmp_eval_coco", json_file, tmp_path)
    cleanup.append("tmp_eval_coco")
    preds = _noisy_predictions(gt, seed=1)

    ev = COCOEvaluator("tmp_eval_coco", output_dir=str(tmp_path / "out"))
    ev.reset()
    ids = sorted(preds)
    ev.process([{"image_id": i} for i in ids[:2]], [preds[i] for i in ids[:2]])
    ev.process([{"image_id": i} for i in ids[2:]], [preds[i] for i in ids[2:]])
    res = ev.evaluate()["bbox"]

    # The same detections scored by pycocotools directly (category id = CAT_IDS[label]).
    results = []
    for i in ids:
        p = preds[i]
        for b, s, l in zip(p["boxes"].tolist(), p["scores"].tolist(), p["labels"].tolist()):
            results.append({"image_id": i, "category_id": CAT_IDS[l], "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": s})
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(json_file))
        e = COCOeval(coco_gt, coco_gt.loadRes(results), "bbox")
        e.evaluate(); e.accumulate(); e.summarize()
    for k, v in zip(["AP", "AP50", "AP75", "APs", "APm", "APl"], e.stats[:6]):
        if v < 0:
            assert np.isnan(res[k])
        else:
            assert res[k] == pytest.approx(100 * v, abs=1e-9), k
    assert 0 < res["AP50"] < 100
    for k, cid in enumerate(CAT_IDS):
        prec = e.eval["precision"][:, :, k, 0, -1]
        assert res[f"AP-class{cid}"] == pytest.approx(100 * prec[prec > -1].mean(), abs=1e-9)

    written = json.loads((tmp_path / "out" / "coco_instances_results.json").read_text())
    assert len(written) == len(results)
    key = lambda r: (r["image_id"], r["score"])  # noqa: E731
    for w, r in zip(sorted(written, key=key), sorted(results, key=key)):
        assert w["category_id"] == r["category_id"] and w["image_id"] == r["image_id"]
        np.testing.assert_allclose(w["bbox"], r["bbox"], rtol=1e-6, atol=1e-4)


def test_coco_evaluator_perfect_empty_and_bad_labels(env, caplog):
    records = get_detection_dataset("synthetic_val", filter_empty=False)
    ev = COCOEvaluator(["synthetic_val"], distributed=False)  # a one-element names list is accepted
    ev.reset()
    ev.process(records, _perfect(records))
    res = ev.evaluate()["bbox"]
    assert res["AP"] == pytest.approx(100.0) and res["AP50"] == pytest.approx(100.0)

    ev.reset()
    assert ev.evaluate() == {}  # nothing processed: warn, no metrics
    ev.process(records[:1], [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}])
    res = ev.evaluate()["bbox"]
    assert res["AP"] == 0.0 and res["AP-circle"] == 0.0
    with pytest.raises(ValueError, match="outside"):
        ev.process(records[:1], [{"boxes": torch.zeros(1, 4), "scores": torch.ones(1), "labels": torch.tensor([5])}])


# --------------------------------------------------------------------------------------------
# Pascal VOC
# --------------------------------------------------------------------------------------------
def _write_voc(root: Path) -> Path:
    """Two images; 1-based VOC coordinates; one difficult box."""
    objects = {
        "000001": [("a", 11, 11, 30, 30, 0), ("a", 51, 51, 80, 80, 0), ("a", 1, 61, 20, 90, 1)],
        "000002": [("b", 11, 11, 50, 50, 0)],
    }
    (root / "Annotations").mkdir(parents=True)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    for fid, objs in objects.items():
        body = "".join(
            f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
            f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
            for n, x0, y0, x1, y1, d in objs
        )
        (root / "Annotations" / f"{fid}.xml").write_text(
            f"<annotation><filename>{fid}.jpg</filename><size><width>100</width><height>100</height>"
            f"<depth>3</depth></size>{body}</annotation>"
        )
    (root / "ImageSets" / "Main" / "test.txt").write_text("000001\n000002\n")
    return root


def _voc_detections():
    # In the loader's frame (xml xmin/ymin minus 1): GT a = (10,10,30,30), (50,50,80,80), difficult (0,60,20,90).
    img1 = {"boxes": torch.tensor([[10.0, 10, 30, 30],   # .9 TP (IoU 1)
                                   [10.0, 10, 30, 30],   # .8 FP (duplicate)
                                   [0.0, 60, 20, 90],    # .75 difficult: ignored
                                   [50.0, 50, 80, 82]]), # .7 IoU 900/960 = 0.9375: TP up to t=0.9, FP at 0.95
            "scores": torch.tensor([0.9, 0.8, 0.75, 0.7]), "labels": torch.tensor([0, 0, 0, 0])}
    img2 = {"boxes": torch.tensor([[10.0, 10, 50, 50], [10.0, 10, 50, 50]]),  # class a: FP; class b: TP
            "scores": torch.tensor([0.6, 0.5]), "labels": torch.tensor([0, 1])}
    return [{"image_id": 1}, {"image_id": 2}], [img1, img2]


def test_voc_evaluator_hand_computed_11_point(tmp_path, cleanup):
    register_pascal_voc("tmp_voc07", _write_voc(tmp_path / "VOC"), "test", year=2007, class_names=["a", "b"])
    cleanup.append("tmp_voc07")
    ev = PascalVOCDetectionEvaluator("tmp_voc07")
    ev.reset()
    inputs, outputs = _voc_detections()
    ev.process(inputs, outputs)
    res = ev.evaluate()["bbox"]
    # Class a, t <= 0.9: ranked TP, FP, (ignored), TP, FP with 2 positives ->
    #   recall .5 .5 .5 1 1, precision 1 .5 .5 2/3 .5; 11-point: r = 0..0.5 -> 1 (6 points),
    #   r = 0.6..1 -> 2/3 (5 points): AP = (6 + 10/3) / 11 = 28/33.
    # Class a, t = 0.95: TP, FP, (ignored), FP, FP -> recall stays .5: AP = 6/11. Class b: 1 everywhere.
    ap_a = 28 / 33
    assert res["AP50-a"] == pytest.approx(100 * ap_a) and res["AP50-b"] == pytest.approx(100.0)
    assert res["AP50"] == pytest.approx(100 * (ap_a + 1) / 2)
    assert res["AP75"] == pytest.approx(100 * (ap_a + 1) / 2)
    assert res["AP"] == pytest.approx(100 * (9 * (ap_a + 1) / 2 + (6 / 11 + 1) / 2) / 10)


def test_voc_evaluator_area_metric_for_other_years(tmp_path, cleanup):
    register_pascal_voc("tmp_voc12", _write_voc(tmp_path / "VOC"), "test", year=2012, class_names=["a", "b"])
    cleanup.append("tmp_voc12")
    ev = PascalVOCDetectionEvaluator("tmp_voc12")
    inputs, outputs = _voc_detections()
    ev.process(inputs, outputs)
    res = ev.evaluate()["bbox"]
    # Area under the precision envelope for class a at t = 0.5: 0.5 * 1 + 0.5 * 2/3 = 5/6.
    assert res["AP50-a"] == pytest.approx(100 * 5 / 6)


def test_voc_evaluator_perfect_detections_and_unknown_image(env):
    records = get_detection_dataset("synthetic_voc_test", filter_empty=False)
    ev = PascalVOCDetectionEvaluator("synthetic_voc_test")
    ev.process(records, _perfect(records))
    res = ev.evaluate()["bbox"]
    assert res["AP"] == pytest.approx(100.0) and res["AP50"] == pytest.approx(100.0) and res["AP75"] == pytest.approx(100.0)

    ev.reset()
    ev.process(records[:2], _perfect(records[:2]))  # the other images' objects are missed
    assert ev.evaluate()["bbox"]["AP50"] < 100.0
    ev.process([{"image_id": 999999}], _perfect(records[:1]))
    with pytest.raises(ValueError, match="999999"):
        ev.evaluate()


# --------------------------------------------------------------------------------------------
# Inference loop, combined evaluators, distributed gathering
# --------------------------------------------------------------------------------------------
class _Oracle(torch.nn.Module):
    """Returns the (unaugmented) ground truth; checks that it runs in eval mode without grad."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, batch):
        assert not self.training and not torch.is_grad_enabled()
        self.calls += 1
        return [{"boxes": s["gt_boxes"], "scores": torch.ones(len(s["gt_boxes"])), "labels": s["gt_classes"]} for s in batch]


class _Counter(DatasetEvaluator):
    def reset(self):
        self.n = 0

    def process(self, inputs, outputs):
        self.n += len(inputs)

    def evaluate(self):
        return {"count": self.n}


def test_inference_on_dataset(env):
    from tprd.data import DetrDatasetMapper, ResizeShortestEdge, build_detection_test_loader

    ds = get_detection_dataset("synthetic_val", filter_empty=False)
    loader = build_detection_test_loader(ds, DetrDatasetMapper([ResizeShortestEdge(128, 200)], is_train=False), batch_size=3)
    model = _Oracle().train()
    res = inference_on_dataset(model, loader, [COCOEvaluator("synthetic_val"), _Counter()])
    assert res["bbox"]["AP"] == pytest.approx(100.0) and res["count"] == len(ds)
    assert model.training and model.calls == 2  # 4 images in batches of 3; mode restored
    with pytest.raises(KeyError, match="bbox"):  # two evaluators reporting the same key
        ev = DatasetEvaluators([COCOEvaluator("synthetic_val"), PascalVOCDetectionEvaluator("synthetic_voc_test")])
        inference_on_dataset(model, loader, ev)


def _gather_worker(rank, world, init_file, root, queue):
    import torch.distributed as dist

    os.environ["DETECTRON2_DATASETS"] = root
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        records = get_detection_dataset("synthetic_val", filter_empty=False)
        mine = [records[i] for i in range(rank, len(records), world)]
        out = {}
        for name, cls in (("synthetic_val", COCOEvaluator), ("synthetic_voc_test", PascalVOCDetectionEvaluator)):
            ev = cls(name)
            ev.process(mine, _perfect(mine))
            out[name] = ev.evaluate()
        queue.put((rank, out))
    finally:
        dist.destroy_process_group()


def test_evaluators_gather_across_processes(env, tmp_path):
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_gather_worker, args=(r, 2, str(tmp_path / "init"), str(env), queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert results[1] == {"synthetic_val": {}, "synthetic_voc_test": {}}  # only rank 0 reports
    assert results[0]["synthetic_val"]["bbox"]["AP"] == pytest.approx(100.0)  # needs both halves
    assert results[0]["synthetic_voc_test"]["bbox"]["AP50"] == pytest.approx(100.0)


def _devkit_loop_ap(det_image, det_score, det_box, gt_image, gt_box, gt_difficult, thr, use_07):
    """The devkit's sequential algorithm written out plainly (an independent reference)."""
    order = np.argsort(-det_score, kind="stable")
    taken = np.zeros(len(gt_box), bool)
    tp, fp = [], []
    for d in order:
        cand = np.nonzero(gt_image == det_image[d])[0]
        best, jbest = -np.inf, -1
        for j in cand:
            b, g = det_box[d], gt_box[j]
            iw = max(min(b[2], g[2]) - max(b[0], g[0]), 0.0)
            ih = max(min(b[3], g[3]) - max(b[1], g[1]), 0.0)
            inter = iw * ih
            iou = inter / ((b[2] - b[0]) * (b[3] - b[1]) + (g[2] - g[0]) * (g[3] - g[1]) - inter)
            if iou > best:
                best, jbest = iou, j
        if best > thr:
            if gt_difficult[jbest]:
                tp.append(0); fp.append(0)
            elif not taken[jbest]:
                taken[jbest] = True
                tp.append(1); fp.append(0)
            else:
                tp.append(0); fp.append(1)
        else:
            tp.append(0); fp.append(1)
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    rec = tp / (~gt_difficult).sum()
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    if use_07:
        return sum((prec[rec >= t].max() if (rec >= t).any() else 0.0) for t in np.arange(0.0, 1.1, 0.1)) / 11
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    for i in range(len(mpre) - 1, 0, -1):
        mpre[i - 1] = max(mpre[i - 1], mpre[i])
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


@pytest.mark.parametrize("use_07", [True, False])
def test_voc_eval_matches_sequential_devkit_loop(use_07):
    from tprd.evaluation import voc_eval

    rng = np.random.default_rng(7)
    n_img, G, D = 6, 14, 40
    gt_image = rng.integers(0, n_img, G)
    xy = rng.uniform(0, 50, (G, 2))
    gt_box = np.concatenate([xy, xy + rng.uniform(5, 30, (G, 2))], 1)
    gt_difficult = rng.random(G) < 0.2
    src = rng.integers(0, G, D)  # detections jittered around gt boxes (duplicates included)
    det_image = np.where(rng.random(D) < 0.8, gt_image[src], rng.integers(0, n_img, D))
    det_box = gt_box[src] + rng.normal(0, 3, (D, 4))
    det_score = np.round(rng.random(D), 1)  # many ties
    thresholds = [0.3, 0.5, 0.7]
    ours = voc_eval(det_image, det_score, det_box, gt_image, gt_box, gt_difficult, n_img, thresholds, use_07)
    ref = [_devkit_loop_ap(det_image, det_score, det_box, gt_image, gt_box, gt_difficult, t, use_07) for t in thresholds]
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-12)
    assert len(set(np.round(ref, 6))) > 1
