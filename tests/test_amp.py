"""Mixed precision (``train.amp.enabled=True``) through ``train_net``'s engine, for every method.

On a GPU users train with fp16 or bf16 autocast; the same autocast runs on the CPU with bfloat16,
where the backbone, the transformer's linear layers and the heads then compute in bf16 and hand
half-precision logits and boxes to the losses. This test trains every method folder of Deformable
DETR (the eight methods, their ``_TPRD`` variants and ``TPRD``) and ``KD_DETR_TPRD`` of the other
detectors for two iterations under bf16 autocast (the synthetic configs, shrunk as in
``test_ddp_methods.py``), in one process per detector, and checks that every logged loss is finite
and that the second iteration's losses differ from the first (the step updated the student).
fp16 AMP with its ``GradScaler`` is exercised on a dummy model in ``test_engine.py``.
"""
import json
import math
from argparse import Namespace
from pathlib import Path

import pytest

from tprd.data.synthetic import generate_synthetic_dataset
from test_ddp_methods import COMMON, CONFIG_NAMES, DETECTOR_OPTS, FOLDERS, IMAGE_SIZE

REPO = Path(__file__).resolve().parents[1]
RUNS = [("deformable_detr", f) for f in FOLDERS] + [(d, "KD_DETR_TPRD") for d in ("dab_detr", "dino", "rt_detr")]
AMP = ["train.amp.enabled=True", "train.amp.dtype=bfloat16", "train.device=cpu"]


@pytest.fixture(scope="module")
def amp_runs(tmp_path_factory, monkeypatch_module):
    """``{(detector, folder): metrics records}`` of every run of :data:`RUNS` (trained once)."""
    import tprd.engine.main as engine_main
    from tprd.engine.checkpoint import DetectionCheckpointer

    root = tmp_path_factory.mktemp("amp")
    generate_synthetic_dataset(root / "data" / "synthetic", num_train=8, num_val=2, seed=5)
    monkeypatch_module.setenv("DETECTRON2_DATASETS", str(root / "data"))
    # saving costs more than the two iterations; checkpoints are tested elsewhere
    monkeypatch_module.setattr(DetectionCheckpointer, "save", lambda self, name, **kwargs: None)
    results = {}
    for detector, folder in RUNS:
        out = root / detector / folder
        size = IMAGE_SIZE[detector]
        opts = COMMON + DETECTOR_OPTS[detector] + AMP + [
            f"dataloader.train.mapper.augmentation.1.short_edge_length=[{size}]",
            f"dataloader.train.mapper.augmentation.1.max_size={size * 3 // 2}", f"train.output_dir={out}"]
        config = REPO / "projects" / detector / "cfg_distill" / folder / CONFIG_NAMES[detector]
        engine_main.main(Namespace(config_file=str(config), resume=False, eval_only=False, num_gpus=1,
                                   num_machines=1, machine_rank=0, dist_url="auto", opts=opts))
        lines = (out / "metrics.json").read_text().splitlines()
        results[detector, folder] = [json.loads(line) for line in lines if line.strip()]
    return results


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.mark.parametrize("detector,folder", RUNS, ids=[f"{d}-{f}" for d, f in RUNS])
def test_bf16_autocast_trains_every_method(amp_runs, detector, folder):
    records = amp_runs[detector, folder]
    assert [int(r["iteration"]) for r in records] == [0, 1]
    losses = [{k: v for k, v in r.items() if k.startswith(("loss", "distill_")) or k == "total_loss"}
              for r in records]
    assert any(k.startswith("distill_") for k in losses[0]), sorted(losses[0])
    for record in losses:
        bad = {k: v for k, v in record.items() if not math.isfinite(v)}
        assert not bad, f"non-finite losses under bf16 autocast: {bad}"
    assert losses[1]["total_loss"] != losses[0]["total_loss"]
