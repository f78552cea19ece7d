"""``train.cpu_allocator``: the caching allocator for large CPU tensors (tprd/utils/cpu_allocator.py).

The allocator is process-wide, so everything that installs it runs in a child process; one child
runs several checks to pay the extension's load once.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from tprd.utils import cpu_allocator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="the caching allocator needs mmap")


def run_child(body: str, timeout: float = 600) -> dict:
    code = "import json, os, sys\nsys.path.insert(0, %r)\n" % REPO + textwrap.dedent(body)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def behaviour():
    """One child: training steps with and without the allocator, reuse, the bound, fork, disable."""
    return run_child("""
        import resource
        import torch
        from torch import nn
        from tprd.utils import cpu_allocator as ca

        torch.set_num_threads(1)
        out = {}

        def train(steps=3):
            torch.manual_seed(0)
            model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Dropout(0.2),
                                  nn.Conv2d(64, 64, 3, padding=1), nn.Flatten(), nn.Linear(64 * 32 * 32, 10))
            opt = torch.optim.SGD(model.parameters(), lr=0.01)
            for i in range(steps):
                x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(i))
                opt.zero_grad(set_to_none=True)
                model(x).square().mean().backward()
                opt.step()
            return [p.detach().clone() for p in model.parameters()]

        reference = train()
        out["enabled"] = ca.enable()
        out["stats_before"] = ca.stats()
        cached = train()
        out["identical"] = all(torch.equal(a, b) for a, b in zip(reference, cached))
        out["after_training"] = ca.stats()

        # Same sizes again: served from the cache, no new pages.
        def churn(nbytes, count):
            blocks = [torch.ones(nbytes // 4) for _ in range(count)]
            total = sum(float(b[0]) for b in blocks)
            del blocks
            return total

        churn(4 << 20, 20)
        s0 = ca.stats(); f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        churn(4 << 20, 20)
        s1 = ca.stats(); f1 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        out["reuse"] = {"misses": s1["misses"] - s0["misses"], "hits": s1["hits"] - s0["hits"],
                        "minor_faults": f1 - f0, "mapped_growth": s1["mapped"] - s0["mapped"]}

        # A size change (multi-scale training): the old blocks are handed back, not piled up.
        for nbytes in (3 << 20, 5 << 20, 7 << 20, 3 << 20, 9 << 20):
            churn(nbytes, 20)
            s = ca.stats()
            out.setdefault("bound", []).append({"mapped": s["mapped"], "max_live": s["max_live"]})

        # A tensor allocated by the allocator, freed after it was switched off, and a DataLoader
        # worker forked while it is on.
        kept = torch.ones(2 << 20)
        loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(torch.arange(4.0)), batch_size=1, num_workers=2,
            multiprocessing_context="fork", collate_fn=lambda b: torch.full((1 << 20,), float(b[0][0])).sum())
        out["fork"] = [float(v) for v in loader]
        out["disabled"] = ca.disable()
        out["active_after_disable"] = ca.stats()["active"]
        del kept
        torch.ones(4 << 20).sum()
        out["disable_again"] = ca.disable()
        print(json.dumps(out))
    """)


def test_training_is_bit_identical_with_the_cache(behaviour):
    assert behaviour["enabled"] is True
    assert behaviour["identical"] is True
    stats = behaviour["after_training"]
    assert stats["hits"] > 0  # later steps reuse the first step's blocks
    assert stats["misses"] > 0 and stats["mapped"] > 0


def test_same_sizes_are_served_from_the_cache_without_page_faults(behaviour):
    reuse = behaviour["reuse"]
    assert reuse["misses"] == 0 and reuse["hits"] == 20
    assert reuse["mapped_growth"] == 0
    # 80 MiB of fresh pages would be 20480 faults of 4 KiB; reused pages fault none.
    assert reuse["minor_faults"] < 2000


def test_mapped_bytes_stay_within_the_slack_of_the_live_peak(behaviour):
    for step in behaviour["bound"]:
        assert step["mapped"] <= 1.25 * step["max_live"] + (1 << 20)
    assert behaviour["bound"][-1]["max_live"] >= 20 * (9 << 20)


def test_fork_and_disable(behaviour):
    assert behaviour["fork"] == [float(1 << 20) * i for i in range(4)]
    assert behaviour["disabled"] is True
    assert behaviour["active_after_disable"] is False
    assert behaviour["disable_again"] is False


def test_profiler_sees_the_large_blocks():
    out = run_child("""
        import torch
        from torch.profiler import ProfilerActivity, profile
        from tprd.utils import cpu_allocator as ca
        assert ca.enable()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            a = torch.empty(8 << 20, dtype=torch.uint8)
            a.fill_(1)
            del a
        rows = {e.key: e.cpu_memory_usage for e in prof.key_averages()}
        print(json.dumps({"empty": rows.get("aten::empty", 0)}))
    """)
    assert out["empty"] == 8 << 20


def test_a_failed_build_keeps_torchs_allocator():
    out = run_child("""
        import logging
        import torch
        from torch.utils import cpp_extension
        from tprd.utils import cpu_allocator as ca

        def no_compiler(*a, **k):
            raise RuntimeError("Error building extension: c++: command not found")

        cpp_extension.load_inline = no_compiler
        records = []
        logging.getLogger("tprd.utils.cpu_allocator").addHandler(
            type("H", (logging.Handler,), {"emit": lambda self, r: records.append(r.getMessage())})())
        ok = ca.enable()
        total = float(torch.ones(4 << 20).sum())
        print(json.dumps({"ok": ok, "records": records, "total": total, "stats": ca.stats()}))
    """)
    assert out["ok"] is False
    assert out["total"] == float(4 << 20)
    assert out["stats"] == {}
    assert any("could not be built" in r and "command not found" in r for r in out["records"])


@pytest.mark.parametrize("kwargs", [dict(min_block=100), dict(min_block=True), dict(max_waste=-0.1),
                                    dict(slack="big"), dict(slack=10.0)])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        cpu_allocator.enable(**kwargs)


def test_config_choices():
    with pytest.raises(ValueError, match="train.cpu_allocator='fast'"):
        cpu_allocator.apply_config("fast", "cpu")
    # Neither installs anything: torch's allocator on GPU runs with "auto", and with "default".
    assert cpu_allocator.apply_config("auto", "cuda") is False
    assert cpu_allocator.apply_config("auto", "cuda:1") is False
    assert cpu_allocator.apply_config("default", "cpu") is False


def test_default_setup_installs_it_for_cpu_runs(tmp_path):
    out = run_child(f"""
        from omegaconf import OmegaConf
        import torch
        from tprd.engine import defaults
        from tprd.utils import cpu_allocator as ca

        args = type("Args", (), {{"config_file": "", "eval_only": False}})()
        result = {{}}
        for name, train in (("default", {{"device": "cpu", "cpu_allocator": "default"}}),
                            ("cuda", {{"device": "cuda"}}),
                            ("cpu", {{"device": "cpu"}})):
            out_dir = os.path.join({str(tmp_path)!r}, name)
            cfg = OmegaConf.create({{"train": dict(output_dir=out_dir, seed=1, **train)}})
            defaults.default_setup(cfg, args, save_config=False)
            torch.ones(2 << 20).sum()
            log = open(os.path.join(out_dir, "log.txt")).read()
            result[name] = {{"active": bool(ca.stats().get("active")), "logged": "cached and reused" in log}}
        print(json.dumps(result))
    """)
    assert out["default"] == {"active": False, "logged": False}
    assert out["cuda"] == {"active": False, "logged": False}
    assert out["cpu"] == {"active": True, "logged": True}


def test_the_common_train_config_declares_auto():
    from tprd.config import LazyConfig

    cfg = LazyConfig.load(os.path.join(REPO, "configs/common/train.py"))
    assert cfg.train.cpu_allocator == "auto"
