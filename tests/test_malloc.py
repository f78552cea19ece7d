"""``train.cpu_mmap_threshold``: glibc's mmap threshold fixed for the process (tprd/utils/malloc.py)."""
import json
import subprocess
import sys
import textwrap

import pytest

from tprd.utils.malloc import _libc, set_mmap_threshold

GLIBC = _libc() is not None and hasattr(_libc(), "mallinfo2")

# A child process (mallopt is process-wide): malloc and free a 16 MiB block, then malloc an 8 MiB
# one, and report how many bytes glibc holds in mmapped blocks (mallinfo2().hblkhd). With glibc's
# dynamic threshold the free raises the threshold to 16 MiB, so the 8 MiB block comes from the heap;
# with the threshold fixed at 4 MiB it is mmapped.
CHILD = textwrap.dedent("""
    import ctypes, json, sys
    sys.path.insert(0, {repo!r})
    from tprd.utils.malloc import set_mmap_threshold

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                     "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.mallinfo2.restype = MallInfo2
    applied = set_mmap_threshold({threshold})
    big = libc.malloc(16 << 20)
    libc.free(big)
    block = libc.malloc(8 << 20)
    print(json.dumps({{"applied": applied, "mmapped": libc.mallinfo2().hblkhd}}))
    libc.free(block)
""")


def _child(threshold):
    import os

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", CHILD.format(repo=repo, threshold=threshold)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="glibc only (mallopt, mallinfo2)")
def test_fixed_threshold_keeps_blocks_above_it_out_of_the_heap():
    default = _child(None)
    fixed = _child(4 << 20)
    assert default == {"applied": False, "mmapped": default["mmapped"]}
    assert default["mmapped"] < 8 << 20  # glibc raised its threshold: the 8 MiB block is in the heap
    assert fixed["applied"] is True
    assert fixed["mmapped"] >= 8 << 20  # fixed at 4 MiB: the 8 MiB block is mapped on its own


@pytest.mark.parametrize("bad", [-1, 64 << 20, 1.5, "4M", True])
def test_bad_values_name_the_key(bad):
    with pytest.raises(ValueError, match=r"train\.cpu_mmap_threshold"):
        set_mmap_threshold(bad)


def test_none_leaves_glibc_alone():
    assert set_mmap_threshold(None) is False


def test_default_setup_applies_the_config_key(monkeypatch, tmp_path):
    from omegaconf import OmegaConf

    from tprd.engine import defaults

    seen = []
    monkeypatch.setattr(defaults, "set_mmap_threshold", lambda n: seen.append(n) or n is not None)
    cfg = OmegaConf.create({"train": {"output_dir": str(tmp_path), "seed": 1, "cpu_mmap_threshold": 4194304}})
    defaults.default_setup(cfg, type("Args", (), {"config_file": "", "eval_only": False})(), save_config=False)
    assert seen == [4194304]
    assert "mmap threshold fixed at 4194304" in (tmp_path / "log.txt").read_text()


def test_the_common_train_config_declares_the_key():
    from tprd.config import LazyConfig
    import os

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = LazyConfig.load(os.path.join(repo, "configs/common/train.py"))
    assert "cpu_mmap_threshold" in cfg.train
