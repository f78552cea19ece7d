"""What a run leaves in its folders and shows on the terminal (the dummy detector of test_engine.py).

* leftovers of checkpoint writes killed by SIGKILL are removed when a run starts or resumes;
* checkpoints and generated datasets get the umask's permissions (0644 / 0755 under umask 022),
  not tempfile's 0600 / 0700;
* ``--eval-only`` writes next to the evaluated checkpoint (``eval_<name>``, ``-2`` ...), never over
  an earlier result, or into ``train.output_dir`` when that is given on the command line;
* ``--resume`` of a finished run logs no training line without values;
* a progress bar is drawn on a terminal only.
"""
import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from test_engine import ckpt_files, make_args, write_config
from tprd.engine.checkpoint import DetectionCheckpointer
from tprd.engine.main import main
from tprd.progress import bar_enabled, progress_bar

SHORT = ["train.max_iter=4", "train.eval_period=0", "train.checkpointer.period=2"]


def kill_during_save(path):
    """Start an atomic save of ``path`` in a subprocess that is SIGKILLed while writing."""
    script = textwrap.dedent(
        f"""
        import os, signal, torch
        from tprd.engine.checkpoint import atomic_torch_save
        def dying_save(obj, f, *a, **k):
            f.write(b"x" * 4096); f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = dying_save
        atomic_torch_save({{"model": {{}}}}, {str(path)!r})
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr


def test_leftover_temporary_checkpoint_is_removed_on_resume(tmp_path):
    out = tmp_path / "run"
    cfg = write_config(tmp_path, str(out))
    main(make_args(cfg, *SHORT))
    kill_during_save(out / "model_0000005.pth")
    leftovers = [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1 and leftovers[0].startswith(".model_0000005.pth.")
    (out / "notes.tmp").write_text("a user's file")  # not hidden: not ours
    (out / ".hidden").write_text("a user's file")

    main(make_args(cfg, "train.max_iter=6", "train.eval_period=0", "train.checkpointer.period=2", resume=True))
    names = {p.name for p in out.iterdir()}
    assert not names & set(leftovers)
    assert {"notes.tmp", ".hidden", "model_final.pth"} <= names
    log = (out / "log.txt").read_text()
    assert f"Removed {out / leftovers[0]}" in log and "Resumed at iteration 4 of 6" in log
    assert torch.load(out / "model_final.pth", weights_only=False)["iteration"] == 5


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_checkpoint_permissions_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        DetectionCheckpointer(nn.Linear(3, 2), str(tmp_path)).save("model_0000000", iteration=0)
    finally:
        os.umask(old)
    for name in ("model_0000000.pth", "last_checkpoint"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000000.pth"]


def test_generated_dataset_permissions_follow_the_umask(tmp_path):
    from tprd.data.synthetic import generate_synthetic_dataset

    old = os.umask(0o022)
    try:
        generate_synthetic_dataset(tmp_path / "synthetic", num_train=1, num_val=1, image_size=(32, 32))
    finally:
        os.umask(old)
    assert (tmp_path / "synthetic").stat().st_mode & 0o777 == 0o755  # readable by others, not 0700
    assert (tmp_path / "synthetic" / "annotations" / "instances_val.json").stat().st_mode & 0o777 == 0o644


def test_two_eval_only_runs_keep_both_results(tmp_path):
    out = tmp_path / "run"
    cfg = write_config(tmp_path, str(out))
    main(make_args(cfg, *SHORT))
    assert ckpt_files(out) == ["model_0000001.pth", "model_final.pth"]
    train_files = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    early = main(make_args(cfg, f"train.init_checkpoint={out / 'model_0000001.pth'}", eval_only=True))
    final = main(make_args(cfg, f"train.init_checkpoint={out / 'model_final.pth'}", eval_only=True))
    assert early["bbox"]["mIoU"] != pytest.approx(final["bbox"]["mIoU"])  # two different checkpoints
    first_log = (out / "eval_model_final" / "log.txt").read_text()
    again = main(make_args(cfg, f"train.init_checkpoint={out / 'model_final.pth'}", eval_only=True))
    assert again["bbox"] == pytest.approx(final["bbox"])

    for folder in ("eval_model_0000001", "eval_model_final", "eval_model_final-2"):
        assert {"log.txt", "config.yaml"} <= {p.name for p in (out / folder).iterdir()}, folder
        assert f"--eval-only: results written to {out / folder}" in (out / folder / "log.txt").read_text()
    assert (out / "eval_model_final" / "log.txt").read_text() == first_log  # not written again
    # the training run's own files are untouched
    assert {n: (out / n).read_bytes() for n in train_files} == train_files

    # given on the command line, train.output_dir is used as it is
    chosen = tmp_path / "chosen"
    main(make_args(cfg, f"train.output_dir={chosen}", f"train.init_checkpoint={out / 'model_final.pth'}",
                   eval_only=True))
    assert (chosen / "log.txt").is_file() and not (out / "eval_model_final-3").exists()
    # --resume evaluates the run's last checkpoint, next to it
    main(make_args(cfg, resume=True, eval_only=True))
    assert (out / "eval_model_final-3" / "log.txt").is_file()


def test_eval_only_on_two_processes_shares_one_fresh_folder(tmp_path):
    from tprd.engine.launch import launch

    out = tmp_path / "run"
    cfg = write_config(tmp_path, str(out))
    main(make_args(cfg, "train.max_iter=2", "train.eval_period=0"))
    args = make_args(cfg, f"train.init_checkpoint={out / 'model_final.pth'}", eval_only=True, num_gpus=2)
    launch(main, 2, args=(args,))
    assert {"log.txt", "log.txt.rank1"} <= {p.name for p in (out / "eval_model_final").iterdir()}
    assert not (out / "eval_model_final-2").exists()  # the second process did not pick its own


def test_resuming_a_finished_run_only_evaluates(tmp_path):
    out = tmp_path / "run"
    cfg = write_config(tmp_path, str(out))
    main(make_args(cfg, *SHORT))
    before = (out / "log.txt").read_text()
    main(make_args(cfg, *SHORT, resume=True))
    added = (out / "log.txt").read_text()[len(before):]
    assert "has finished already (iteration 4 of 4)" in added
    assert "N/A" not in added and "iter: " not in added  # no training line without values
    assert "copypaste: AP" in added


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bars_only_on_a_terminal(tmp_path, monkeypatch):
    assert not bar_enabled(io.StringIO()) and bar_enabled(FakeTerminal())
    with progress_bar(3, "quiet", file=io.StringIO()) as bar:  # not a terminal: a stand-in
        bar.update(1)
    assert type(bar).__name__ == "NoBar"

    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    out = tmp_path / "run"
    main(make_args(write_config(tmp_path, str(out)), "train.max_iter=3", "train.eval_period=0"))
    drawn = terminal.getvalue()
    assert "train: 100%" in drawn and "3/3" in drawn and "s/it" in drawn and "loss " in drawn
    assert "eval:" in drawn and "img/s" in drawn
    assert "train:" not in (out / "log.txt").read_text()  # the log file gets no bar
