"""A killed and resumed run ends bit-identical to the uninterrupted run, with random draws.

``tools/train_net.py`` on a Deformable DETR distillation config with student dropout 0.1, KD-DETR's
random general points and MGD's random masks together, with the synthetic data's random
augmentation: trained straight through, and trained, killed with SIGKILL (the whole process group)
after its first checkpoint and finished with ``--resume``. The final weights (student, adapters,
teacher), optimizer state and schedule must be exactly equal, on one process and on two (gloo).
Each step's random state follows from ``(train.seed, rank, iteration)``
(:class:`tprd.engine.hooks.IterationSeeds`), the methods' generators from the iteration.
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tprd.data.synthetic import generate_synthetic_dataset
from tprd.engine.hooks import iteration_seed

REPO = Path(__file__).resolve().parents[1]
METHOD_CFG = REPO / "projects" / "deformable_detr" / "cfg_distill" / "{}" / "deformable_detr_r50_distill_r18_synthetic.py"

CONFIG = f'''
from tprd.config import LazyConfig

_kd = LazyConfig.load("{str(METHOD_CFG).format("KD_DETR")}")
_mgd = LazyConfig.load("{str(METHOD_CFG).format("MGD")}")
model = _kd.model
model.methods.mgd = _mgd.model.methods.mgd
dataloader, optimizer, lr_multiplier, train = _kd.dataloader, _kd.optimizer, _kd.lr_multiplier, _kd.train
'''

OPTS = [
    "train.max_iter=6", "train.checkpointer.period=2", "train.log_period=1", "train.eval_period=0",
    "dataloader.evaluator=None", "dataloader.train.num_workers=0",
    # small images (random flips and crops stay on), a ResNet-18 teacher: seconds per run
    "dataloader.train.mapper.augmentation.1.short_edge_length=[56,64,72]", "dataloader.train.mapper.augmentation.1.max_size=100",
    "dataloader.train.mapper.augmentation_with_crop.3.short_edge_length=[56,64,72]",
    "dataloader.train.mapper.augmentation_with_crop.3.max_size=100",
    "model.teacher.backbone.depth=18", "model.teacher.neck.in_channels=[128,256,512]",
    "model.methods.kd_detr.general_points=20",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume_random")
    generate_synthetic_dataset(root / "datasets" / "synthetic", num_train=8, num_val=2, seed=4)
    config = root / "kd_detr_and_mgd.py"
    config.write_text(CONFIG)
    return root, config


def _start(setup, out, num_gpus, *extra):
    root, config = setup
    env = dict(os.environ, DETECTRON2_DATASETS=str(root / "datasets"), OMP_NUM_THREADS="1")
    # this checkout's package, also where another checkout is installed in the environment
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    batch = 2 * num_gpus
    cmd = [sys.executable, "tools/train_net.py", "--config-file", str(config), "--num-gpus", str(num_gpus), *extra,
           *OPTS, f"dataloader.train.total_batch_size={batch}", f"train.output_dir={out}"]
    # own session: a SIGKILL of the group reaches the spawned workers too
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _finish(proc):
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log[-5000:]
    return log


def _kill_after_first_checkpoint(proc, out):
    deadline = time.time() + 400
    try:
        while not (out / "last_checkpoint").is_file():
            assert proc.poll() is None, proc.stdout.read()[-5000:]
            assert time.time() < deadline, "no checkpoint written in time"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    assert not (out / "model_final.pth").exists()


@pytest.mark.parametrize("num_gpus", [1, 2])
def test_killed_and_resumed_run_is_bit_identical(setup, tmp_path, num_gpus):
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    first = _start(setup, straight, num_gpus)
    second = _start(setup, cut, num_gpus)  # both at once: the kill lands while the first still trains
    _kill_after_first_checkpoint(second, cut)
    saved = torch.load(cut / (cut / "last_checkpoint").read_text(), weights_only=False)
    assert saved["iteration"] < 5 and saved["rng"] == {"seed": 1}
    log = _finish(_start(setup, cut, num_gpus, "--resume"))
    assert f"Resumed at iteration {saved['iteration'] + 1} of 6" in (cut / "log.txt").read_text(), log[-3000:]
    _finish(first)

    ref = torch.load(straight / "model_final.pth", weights_only=False)
    got = torch.load(cut / "model_final.pth", weights_only=False)
    assert ref["iteration"] == got["iteration"] == 5
    assert ref["model"].keys() == got["model"].keys()
    assert any(k.startswith("methods.") and ".generators." in k for k in ref["model"])  # MGD's layers too
    different = [k for k in ref["model"] if not torch.equal(ref["model"][k], got["model"][k])]
    assert not different, different[:10]
    for k, state in ref["optimizer"]["state"].items():
        for name, t in state.items():
            assert torch.equal(torch.as_tensor(got["optimizer"]["state"][k][name]), torch.as_tensor(t)), (k, name)
    assert got["scheduler"] == ref["scheduler"]


def test_iteration_seeds_differ_by_rank_and_iteration():
    seeds = {iteration_seed(1, r, i) for r in range(4) for i in range(100)}
    assert len(seeds) == 400 and all(0 <= s < 2**63 for s in seeds)
    assert iteration_seed(1, 0, 5) == iteration_seed(1, 0, 5) != iteration_seed(2, 0, 5)
