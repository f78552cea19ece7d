"""Wrong checkpoints and bad values through the command lines (issue 14): ``train_net.py`` and
``merge_weight.py`` exit non-zero with one message as the last line of output, naming the file or
key, and leave no partial result (no checkpoint, metrics or predictions) in the output folder;
the partial loads users intend (a backbone-only file, fresh class heads) still train.
"""
import os
import runpy
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch
import torchvision

from tprd.config import LazyConfig, instantiate
from tprd.data.synthetic import generate_synthetic_dataset
from tprd.engine.main import main, run

REPO = Path(__file__).resolve().parents[1]
SCRIPT = "projects/deformable_detr/train_net.py"
CONFIG = "projects/deformable_detr/configs/deformable_detr_r18_synthetic.py"
DINO_CONFIG = "projects/dino/configs/dino_r18_synthetic.py"
MODEL_FAST = ["model.num_queries=20", "model.select_box_nums_for_evaluation=20"]
FAST = ["train.log_period=1", "dataloader.train.total_batch_size=2", "train.eval_period=0", *MODEL_FAST]
RESULTS = ("*.pth", "metrics.json", "coco_instances_results.json", "events.out.tfevents.*", "last_checkpoint")


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    generate_synthetic_dataset(root / "synthetic", num_train=4, num_val=2, seed=3)
    return root


@pytest.fixture
def data_env(datasets, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(datasets))
    return datasets


def run_script(datasets, *argv):
    """Run a script of the repository in a new process: ``(exit code, last non-empty line of
    stdout+stderr, all output)``."""
    env = dict(os.environ, DETECTRON2_DATASETS=str(datasets), OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, *argv], cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    return proc.returncode, lines[-1] if lines else "", proc.stdout


def run_in_process(capfd, entry, argv):
    """The same command line through the script's entry function in this process (no interpreter
    start-up): ``(exit code, last line, all output)``; the error is written last, to stderr."""
    capfd.readouterr()
    with pytest.raises(SystemExit) as stop:
        code = entry(argv)
        raise SystemExit(code)
    out, err = capfd.readouterr()
    lines = [line for line in (out + err).splitlines() if line.strip()]
    return stop.value.code, lines[-1] if lines else "", out + err


def train_net_argv(out, *opts, flags=()):
    return [*flags, "--config-file", CONFIG, f"train.output_dir={out}", *FAST, *opts]


def no_results(out: Path) -> bool:
    return not any(list(out.glob(pattern)) for pattern in RESULTS) if out.exists() else True


def args(out, *opts, eval_only=False):
    return Namespace(config_file=str(REPO / CONFIG), resume=False, eval_only=eval_only, num_gpus=1, num_machines=1,
                     machine_rank=0, dist_url="auto", opts=[f"train.output_dir={out}", *FAST, *opts])


def model_state(config, *overrides):
    cfg = LazyConfig.apply_overrides(LazyConfig.load(REPO / config), [*MODEL_FAST, *overrides])
    return instantiate(cfg.model).state_dict()


def text_file(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("these are my notes, not weights\n" * 10)
    return path


def text_file_message(path):
    return (f"error: {path} is not a PyTorch checkpoint or pickle (starts with b'these are my not', "
            f"{path.stat().st_size} bytes; neither a zip archive as torch.save writes nor a binary pickle); "
            "expected a .pth/.pkl written by torch.save or detectron2")


# ------------------------------------------------------------------------------------------ errors
def test_scripts_end_with_one_message(datasets, tmp_path):
    """The real scripts in a new process: train_net.py with a text file as init checkpoint and
    merge_weight.py with a garbage input; the other cases run the same entry points in-process."""
    path = text_file(tmp_path)
    out = tmp_path / "out"
    code, last, log = run_script(datasets, SCRIPT, *train_net_argv(out, f"train.init_checkpoint={path}"))
    assert code != 0 and "Traceback" not in log
    assert last == text_file_message(path)
    assert not out.exists()

    garbage = tmp_path / "garbage.pkl"
    garbage.write_bytes(bytes([0xB7, 0x00, 0xFF]) * 50)
    merged = tmp_path / "merged.pth"
    code, last, log = run_script(datasets, "merge_weight.py", "--input1", str(garbage), "--input2", str(path),
                                 "--output", str(merged))
    assert code != 0 and "Traceback" not in log
    assert last.startswith(f"error: {garbage} is not a PyTorch checkpoint or pickle (starts with b'\\xb7\\x00\\xff")
    assert not merged.exists()


def test_eval_only_refuses_a_checkpoint_of_another_detector(data_env, tmp_path, capfd):
    ckpt = tmp_path / "dino.pth"
    torch.save({"model": model_state(DINO_CONFIG)}, ckpt)
    out = tmp_path / "eval"
    code, last, log = run_in_process(capfd, run, train_net_argv(out, f"train.init_checkpoint={ckpt}", flags=["--eval-only"]))
    assert code != 0 and "Traceback" not in log
    assert last.startswith(f"--eval-only refused checkpoint {ckpt} for DeformableDETR of config {CONFIG}: ")
    assert "model tensors missing" in last and "a TPRD (this toolbox's naming) DINO checkpoint with 5 classes" in last
    assert "query_embedding.weight" in log  # the missing keys are listed above the last line
    assert no_results(out)


def test_eval_only_with_a_text_file(data_env, tmp_path, capfd):
    path = text_file(tmp_path)
    out = tmp_path / "out"
    code, last, log = run_in_process(capfd, run, train_net_argv(out, f"train.init_checkpoint={path}", flags=["--eval-only"]))
    assert code != 0 and "Traceback" not in log
    assert last == text_file_message(path)
    assert not out.exists()


def test_a_truncated_checkpoint(data_env, tmp_path, capfd):
    whole = tmp_path / "whole.pth"
    torch.save({"model": {"w": torch.zeros(1000)}}, whole)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(whole.read_bytes()[:2000])
    out = tmp_path / "out"
    code, last, log = run_in_process(capfd, run, train_net_argv(out, f"train.init_checkpoint={cut}"))
    assert code != 0 and "Traceback" not in log
    assert last.startswith(f"error: {cut} is not a PyTorch checkpoint or pickle (starts with b'PK")
    assert "the file looks truncated" in last and last.endswith("written by torch.save or detectron2")
    assert not out.exists()


@pytest.mark.parametrize("gpus", ["1", "2"])  # 2: checked before any worker is spawned
def test_an_override_of_the_wrong_type(data_env, tmp_path, capfd, gpus):
    out = tmp_path / "out"
    code, last, log = run_in_process(capfd, run, train_net_argv(out, "train.max_iter=abc", flags=["--num-gpus", gpus]))
    assert code != 0 and "Traceback" not in log
    assert last == "error: train.max_iter=abc: expected an int (current value 600)"
    assert not out.exists()


def test_merge_weight_with_a_text_file_as_teacher(tmp_path, capfd):
    merge_main = runpy.run_path(str(REPO / "merge_weight.py"), run_name="merge_weight")["main"]
    good = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), good)
    path = text_file(tmp_path)
    merged = tmp_path / "merged.pth"
    code, last, log = run_in_process(capfd, merge_main, ["--input1", str(good), "--input2", str(path),
                                                         "--output", str(merged)])
    assert code != 0 and "Traceback" not in log
    assert last == text_file_message(path)
    assert not merged.exists()


# ------------------------------------------------------------------------ training init loads
def test_training_init_refuses_almost_nothing_and_other_class_counts(data_env, tmp_path, capfd):
    seven = model_state(CONFIG, "model.num_classes=7")
    ckpt = tmp_path / "seven_classes.pth"
    torch.save({"model": seven}, ckpt)
    out = tmp_path / "run"
    code, last, log = run_in_process(capfd, run, train_net_argv(out, f"train.init_checkpoint={ckpt}", "train.max_iter=1"))
    assert code != 0 and "Traceback" not in log
    assert last.startswith(f"train.init_checkpoint {ckpt} has 4 tensors of another shape than DeformableDETR")
    assert "the class heads are for another class count (7 in the checkpoint, 5 in the model)" in last
    assert "train.init_skip_class_heads=True" in last
    assert no_results(out)

    neck_only = tmp_path / "neck.pth"  # 16 of the model's 232 tensors: under 10 %
    torch.save({k: v for k, v in seven.items() if k.startswith("neck.")}, neck_only)
    with pytest.raises(ValueError, match=r"fills only 16 of 232 tensors .* \(6.9%, under the 10% minimum"):
        main(args(tmp_path / "run2", f"train.init_checkpoint={neck_only}", "train.max_iter=1"))
    assert no_results(tmp_path / "run2")

    # the documented override: fresh class heads, everything else from the checkpoint
    main(args(tmp_path / "run3", f"train.init_checkpoint={ckpt}", "train.max_iter=1", "train.init_skip_class_heads=True"))
    log3 = (tmp_path / "run3" / "log.txt").read_text()
    assert f"Loaded 228 of 232 model tensors from {ckpt}" in log3 and "missing by module: class_embed 4" in log3
    assert "4 class-head tensors left as initialised (train.init_skip_class_heads=True)" in log3
    saved = torch.load(tmp_path / "run3" / "model_final.pth", weights_only=False)["model"]
    assert saved["class_embed.0.weight"].shape == (5, 128)
    # the rest came from the checkpoint (one AdamW step moves a weight by about lr = 1e-4)
    torch.testing.assert_close(saved["query_embedding.weight"], seven["query_embedding.weight"], atol=1e-3, rtol=0)


def test_training_init_from_a_backbone_only_file(data_env, tmp_path):
    tv = torchvision.models.resnet18(weights=None).state_dict()
    ckpt = tmp_path / "resnet18.pth"
    torch.save(tv, ckpt)
    out = tmp_path / "run"
    main(args(out, f"train.init_checkpoint={ckpt}", "train.max_iter=1"))
    log = (out / "log.txt").read_text()
    line = next(line for line in log.splitlines() if "model tensors from" in line)
    assert "as a backbone-only checkpoint" in line and "unexpected by module: none" in line
    assert "missing by module: transformer" in line and "backbone" not in line.split("missing by module:")[1]
    saved = torch.load(out / "model_final.pth", weights_only=False)["model"]
    # one AdamW step moves a weight by about the learning rate (1e-4); a fresh init differs by ~0.1
    torch.testing.assert_close(saved["backbone.layer1.0.conv1.weight"], tv["layer1.0.conv1.weight"], atol=1e-3, rtol=0)
    assert (saved["backbone.layer1.0.conv1.weight"] - tv["layer1.0.conv1.weight"]).abs().max() > 0  # and it trained
