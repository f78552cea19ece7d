"""``tools/gpu_check.py`` on a machine without CUDA: says so, writes nothing, exits 0."""
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
