"""COCOEvaluator's two engines (pycocotools, faster-coco-eval) give the same metrics.

A COCO-like synthetic run (400 images, 80 non-contiguous categories, crowd boxes, 100 detections
per image; ``benchmarks/coco_eval.py`` at a smaller size) scored by both: every metric, the 80
per-class APs included, agrees to 1e-4 AP points. Also: ``engine="auto"`` picks faster-coco-eval
when it is installed and pycocotools when it is not, and an unknown engine is a clear error.
"""
import sys
from pathlib import Path

import numpy as np
import pytest

import tprd.evaluation.coco as coco
from tprd.data.catalog import DatasetCatalog, MetadataCatalog, register_coco_instances
from tprd.evaluation import COCOEvaluator

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import coco_eval  # noqa: E402

NAME = "tmp_coco_engines"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("coco_engines")
    path, preds = coco_eval.make_run(str(folder), images=400, seed=3)
    register_coco_instances(NAME, path, folder)
    yield preds
    DatasetCatalog.remove(NAME)
    MetadataCatalog.remove(NAME)


def test_both_engines_give_the_same_metrics(run):
    pytest.importorskip("faster_coco_eval", reason="faster-coco-eval is an optional extra (pip install faster-coco-eval)")
    slow, _ = coco_eval.evaluate(NAME, run, "pycocotools")
    fast, _ = coco_eval.evaluate(NAME, run, "faster_coco_eval")
    assert slow.keys() == fast.keys() and len(slow) == 6 + 80
    assert 5.0 < slow["AP"] < 95.0  # a non-trivial score
    for k in slow:
        if np.isnan(slow[k]):
            assert np.isnan(fast[k]), k
        else:
            assert abs(slow[k] - fast[k]) <= 1e-4, (k, slow[k], fast[k])


def test_auto_engine_and_errors(run, monkeypatch):
    monkeypatch.setattr(coco, "faster_coco_eval_available", lambda: False)
    assert COCOEvaluator(NAME, engine="auto").engine == "pycocotools"
    with pytest.raises(ImportError, match="pip install faster-coco-eval"):
        COCOEvaluator(NAME, engine="faster_coco_eval")
    monkeypatch.setattr(coco, "faster_coco_eval_available", lambda: True)
    assert COCOEvaluator(NAME, engine="auto").engine == "faster_coco_eval"
    with pytest.raises(ValueError, match="engine must be one of"):
        COCOEvaluator(NAME, engine="lvis")
