"""``tools/gpu_check.py`` on a machine without CUDA: says so, writes nothing, exits 0."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_without_cuda_says_so_and_exits_0(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    output = tmp_path / "gpu.md"
    run = subprocess.run([sys.executable, "tools/gpu_check.py", "--output", str(output)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "no CUDA device" in run.stdout and "nothing was run" in run.stdout
    assert not output.exists()


def test_gpu_check_help_describes_the_parts():
    run = subprocess.run([sys.executable, "tools/gpu_check.py", "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0
    for part in ("CUDA tests", "MSDA on CUDA", "Training steps", "Two GPUs"):
        assert part in run.stdout


def test_gpu_check_step_measurement_dry_run_on_cpu():
    """The per-step measurement (a child process of the check) runs end to end on a CPU with a small
    image, so a broken config path or API use shows up here rather than on a lent GPU."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    run = subprocess.run([sys.executable, "tools/gpu_check.py", "--child", "RT-DETRv2", "student", "bf16",
                          "--steps", "1", "--device", "cpu", "--size", "128"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads(run.stdout.strip().splitlines()[-1])
    assert record["finite"] is True and record["time"] > 0


def test_gpu_check_step_table_reports_each_precision(monkeypatch):
    """One child per (detector, step) measures every precision; the table gets a row per precision:
    the numbers, the child's error for a precision that failed, "out of time" when the child did."""
    sys.path.insert(0, str(REPO / "tools"))
    import gpu_check

    def fake_run(cmd, timeout):
        detector = cmd[cmd.index("--child") + 1]
        if detector == "DINO":
            return None, "", "", timeout
        out = "\n".join([
            json.dumps({"precision": "fp32", "time": 0.25, "peak_gb": 1.5, "finite": True}),
            json.dumps({"precision": "fp16", "error": "RuntimeError: a | b"}),
            json.dumps({"precision": "bf16", "time": 0.125, "peak_gb": 1.0, "finite": False}),
        ])
        return 0, out, "", 1.0

    monkeypatch.setattr(gpu_check, "_run", fake_run)
    lines = gpu_check.part_steps(2, 60, deadline=float("inf"))
    rows = [line for line in lines if line.startswith("| Deformable DETR | student")]
    assert rows == ["| Deformable DETR | student step | fp32 | 0.250 | 1.50 | yes |",
                    "| Deformable DETR | student step | fp16 | failed | | RuntimeError: a / b |",
                    "| Deformable DETR | student step | bf16 | 0.125 | 1.00 | **no** |"]
    dino = [line for line in lines if line.startswith("| DINO |")]
    assert len(dino) == 6 and all("out of time" in line for line in dino)
    assert sum(line.startswith("| RT-DETRv2 |") for line in lines) == 6
