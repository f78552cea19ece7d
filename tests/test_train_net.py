"""End to end: ``projects/deformable_detr/train_net.py`` on the synthetic data (tiny CPU config).

* the script runs from the repository root without PYTHONPATH, trains a few iterations and
  evaluates with the COCO evaluator (``bbox/AP`` in ``metrics.json``, predictions written);
* ``--eval-only`` with the trained checkpoint reproduces the final evaluation's predictions, also
  when the checkpoint is in detrex naming (an official-checkpoint layout);
* a run killed with SIGKILL resumes with ``--resume`` from its last complete checkpoint.
"""
import json
import os
import signal
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from conftest import DETREX_KEYS_DIR as DETREX_KEYS
from tprd.data.synthetic import generate_synthetic_dataset
from tprd.engine.main import main
from tprd.checkpoint.detrex import adapter_for

REPO = Path(__file__).resolve().parents[1]
SCRIPT = "projects/deformable_detr/train_net.py"
CONFIG = "projects/deformable_detr/configs/deformable_detr_r18_synthetic.py"

# a few tiny images keep every run to seconds; FrozenBN and no box refinement so the model has the
# key names of detrex's R18 Deformable DETR (reference/detrex_keys/deformable_detr_r18_student.json)
FAST = ["train.log_period=1", "dataloader.train.total_batch_size=2", "model.num_queries=20",
        "model.select_box_nums_for_evaluation=20", "model.backbone.norm=FrozenBN", "model.backbone.freeze_at=1",
        "model.with_box_refine=False"]


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    generate_synthetic_dataset(root / "synthetic", num_train=8, num_val=4, seed=3)
    return root


def script_env(datasets):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["DETECTRON2_DATASETS"] = str(datasets)
    env["OMP_NUM_THREADS"] = "1"
    return env


def start_script(datasets, *opts, **kw):
    return subprocess.Popen(
        [sys.executable, SCRIPT, "--config-file", CONFIG, *opts],
        cwd=REPO, env=script_env(datasets), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw
    )


def args(*opts, resume=False, eval_only=False):
    return Namespace(config_file=str(REPO / CONFIG), resume=resume, eval_only=eval_only, num_gpus=1,
                     num_machines=1, machine_rank=0, dist_url="auto", opts=list(opts))


def predictions(folder):
    with open(Path(folder) / "coco_instances_results.json") as f:
        preds = json.load(f)
    return sorted(preds, key=lambda p: (p["image_id"], -p["score"], p["category_id"], p["bbox"]))


def assert_same_predictions(a, b):
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert (x["image_id"], x["category_id"]) == (y["image_id"], y["category_id"])
        assert x["score"] == pytest.approx(y["score"], abs=1e-5)
        assert x["bbox"] == pytest.approx(y["bbox"], abs=1e-3)


@pytest.fixture(scope="module")
def trained(datasets, tmp_path_factory):
    """One script run: 4 iterations + final evaluation."""
    out = tmp_path_factory.mktemp("run")
    proc = start_script(datasets, f"train.output_dir={out}", "train.max_iter=4", *FAST)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log[-4000:]
    return out, log


def test_script_trains_and_evaluates(trained):
    out, log = trained
    records = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    losses = {r["iteration"] for r in records if "total_loss" in r}
    assert losses == {0, 1, 2, 3}
    final = [r for r in records if "bbox/AP" in r]
    assert len(final) == 1 and final[0]["iteration"] == 3
    assert 0.0 <= final[0]["bbox/AP"] <= 100.0 and "bbox/AP50" in final[0]
    for name in ("model_final.pth", "config.yaml", "log.txt", "coco_instances_results.json"):
        assert (out / name).is_file(), name
    assert torch.load(out / "model_final.pth", weights_only=False)["iteration"] == 3
    assert "copypaste: AP,AP50" in log and "eta:" in log


def test_same_seed_reproduces_the_run(trained, datasets, tmp_path, monkeypatch):
    """train.seed fixes weights, sample order and augmentation: a second run logs the same losses."""
    out, _ = trained
    monkeypatch.setenv("DETECTRON2_DATASETS", str(datasets))
    again = tmp_path / "again"
    main(args(f"train.output_dir={again}", "train.max_iter=4", "train.eval_period=0", *FAST))

    def losses(folder):
        records = [json.loads(line) for line in (Path(folder) / "metrics.json").read_text().splitlines()]
        return {r["iteration"]: r["total_loss"] for r in records if "total_loss" in r}

    first, second = losses(out), losses(again)
    assert sorted(first) == sorted(second) == [0, 1, 2, 3]
    for it in first:
        assert second[it] == pytest.approx(first[it], rel=1e-5), it


def test_eval_only_reproduces_predictions(trained, datasets, tmp_path, monkeypatch):
    out, _ = trained
    monkeypatch.setenv("DETECTRON2_DATASETS", str(datasets))
    ev = tmp_path / "eval"
    results = main(args(f"train.output_dir={ev}", f"train.init_checkpoint={out / 'model_final.pth'}", *FAST,
                        eval_only=True))
    assert "bbox" in results and "AP" in results["bbox"]
    assert_same_predictions(predictions(ev), predictions(out))


def test_eval_only_with_a_detrex_format_checkpoint(trained, datasets, tmp_path, monkeypatch):
    keys_file = DETREX_KEYS / "deformable_detr_r18_student.json"
    if not keys_file.is_file():
        pytest.fail(f"detrex key list not found at {keys_file}; set TPRD_REFERENCE_DIR")
    from tprd.modeling.deformable_detr import DeformableDETR

    out, _ = trained
    ours = torch.load(out / "model_final.pth", weights_only=False)["model"]
    detrex_keys = [entry[0] for entry in json.loads(keys_file.read_text())]
    mapping = adapter_for(DeformableDETR).key_map(detrex_keys)
    detrex_sd = {k: ours[o] for k, o in mapping.items() if o in ours}
    assert set(mapping[k] for k in detrex_sd) == set(ours)  # every weight has a detrex name
    assert set(detrex_sd) != set(ours)  # ... and the names really differ
    torch.save({"model": detrex_sd, "__author__": "detrex-style"}, tmp_path / "detrex.pth")

    monkeypatch.setenv("DETECTRON2_DATASETS", str(datasets))
    ev = tmp_path / "eval"
    main(args(f"train.output_dir={ev}", f"train.init_checkpoint={tmp_path / 'detrex.pth'}", *FAST, eval_only=True))
    assert "as detrex naming" in (ev / "log.txt").read_text()
    assert_same_predictions(predictions(ev), predictions(out))


def test_killed_run_resumes_from_last_complete_checkpoint(datasets, tmp_path, monkeypatch):
    out = tmp_path / "run"
    opts = [f"train.output_dir={out}", "train.max_iter=8", "train.checkpointer.period=2", *FAST]
    proc = start_script(datasets, *opts)
    deadline = time.time() + 240
    try:
        while not (out / "last_checkpoint").is_file():
            assert proc.poll() is None, proc.stdout.read()[-4000:]
            assert time.time() < deadline, "no checkpoint written in time"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "model_final.pth").exists()
    name = (out / "last_checkpoint").read_text()
    saved = torch.load(out / name, weights_only=False)  # complete, loadable
    for path in out.glob("*.pth"):
        torch.load(path, weights_only=False)

    monkeypatch.setenv("DETECTRON2_DATASETS", str(datasets))
    main(args(*opts, resume=True))
    log = (out / "log.txt").read_text()
    assert f"Resumed at iteration {saved['iteration'] + 1} of 8" in log
    final = torch.load(out / "model_final.pth", weights_only=False)
    assert final["iteration"] == 7 and final["scheduler"]["last_epoch"] == 8
