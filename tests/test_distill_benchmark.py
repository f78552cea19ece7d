"""tools/distill_benchmark.py (end to end on a tiny plan, killed and resumed) and tools/visualize_tprd.py."""
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


bench = _load_tool("distill_benchmark")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# two methods, one seed, a handful of iterations on a handful of images (the `datasets` fixture)
TINY = ["--methods", "none,KD_DETR_TPRD", "--seeds", "1", "--student-iter", "6", "--teacher-iter", "2",
        "--batch", "2", "--num-evals", "2",
        "dataloader.train.dataset.names=synthetic_train", "dataloader.test.dataset.names=synthetic_val"]


@pytest.fixture
def datasets(tmp_path, monkeypatch):
    from tprd.data.synthetic import generate_synthetic_dataset

    root = tmp_path / "datasets"
    # synthetic_train / synthetic_val accept an existing synthetic dataset of any size: 8 / 4 images
    generate_synthetic_dataset(root / "synthetic", num_train=8, num_val=4)
    monkeypatch.setenv("DETECTRON2_DATASETS", str(root))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return root


def _wait_for(predicate, proc, timeout=300.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def _last_checkpoint(run_dir: Path) -> str:
    try:
        return (run_dir / "last_checkpoint").read_text().strip()
    except OSError:
        return ""


def _valid_png(path: Path) -> bool:
    from PIL import Image

    if path.read_bytes()[:8] != PNG_MAGIC:
        return False
    with Image.open(path) as im:
        im.verify()
        return im.size[0] > 50 and im.size[1] > 50


def test_tiny_plan_killed_resumed_then_skipped(tmp_path, datasets):
    out = tmp_path / "bench"
    run_dir = out / "runs" / "none_seed1"
    # 1. start the plan and kill it hard (SIGKILL to the whole process group) once the student run
    #    has written its first checkpoint (iteration 3 of 6): the run is left unfinished
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "tools" / "distill_benchmark.py"), "--out", str(out), *TINY],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        reached = _wait_for(lambda: _last_checkpoint(run_dir) == "model_0000002.pth", proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert reached, proc.stderr.read().decode()[-3000:]
    assert (out / "teacher" / bench.RESULT_FILE).is_file()  # the teacher finished before
    assert not (run_dir / bench.RESULT_FILE).is_file()

    # 2. the second call resumes the killed run from its checkpoint and finishes the plan
    report = bench.main(["--out", str(out), *TINY])
    assert "Resumed at iteration 3 of 6" in (run_dir / "log.txt").read_text()

    data = json.loads((out / "results.json").read_text())
    assert data == json.loads(json.dumps(report))
    assert isinstance(data["teacher"]["bbox/AP"], float)
    assert sorted((r["method"], r["seed"]) for r in data["runs"]) == [("KD_DETR_TPRD", 1), ("none", 1)]
    for r in data["runs"]:
        keys = {"method", "arm", "seed", "bbox/AP", "bbox/AP50", "bbox/AP75", "sec_per_iter", "output_dir", "machine"}
        assert r["machine"] == bench.machine_fingerprint()  # where its numbers were made
        # a distillation run records the AP of the teacher it learned from
        assert set(r) == (keys if r["method"] == "none" else keys | {bench.TEACHER_AP})
        if r["method"] != "none":
            assert r[bench.TEACHER_AP] == data["teacher"]["bbox/AP"]
        assert r["arm"] == r["method"]  # --methods: arms named after their method
        assert all(isinstance(r[k], float) for k in ("bbox/AP", "bbox/AP50", "bbox/AP75", "sec_per_iter"))
        assert 0.0 <= r["bbox/AP"] <= 100.0 and r["sec_per_iter"] > 0
        assert Path(r["output_dir"]).is_dir()
    # the resumed run's metrics hold each iteration once and end with the final evaluation (the one
    # after iteration 3 is missing when the kill came between the checkpoint and the evaluation)
    recs = bench.read_metrics(run_dir / "metrics.json")
    iters = [r["iteration"] for r in recs]
    assert iters == sorted(set(iters)) and "bbox/AP" in recs[-1] and iters[-1] == 5
    other = bench.read_metrics(out / "runs" / "KD_DETR_TPRD_seed1" / "metrics.json")
    assert [r["iteration"] for r in other if "bbox/AP" in r] == [2, 5]
    md = (out / "results.md").read_text()
    assert "Teacher" in md and "| none |" in md and "| KD_DETR_TPRD |" in md
    for png in ("curves.png", "ap_per_method.png"):
        assert _valid_png(out / png)
    # both methods trained with the same seed, iterations and batch, through train_net
    commands = (out / "commands.sh").read_text().splitlines()[1:]
    assert len(commands) == 3 and all("train_net.py" in c and "--resume" in c for c in commands)
    for key in ("train.seed=1", "train.max_iter=6", "dataloader.train.total_batch_size=2"):
        assert all(key in c for c in commands[1:])

    # 3. a third call skips every finished run (no training: checkpoints and metrics untouched)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("metrics.json")}
    again = bench.main(["--out", str(out), *TINY])
    assert again == report
    assert {p: p.stat().st_mtime_ns for p in out.rglob("metrics.json")} == stamps
    # a changed plan does not silently reuse the stored runs
    with pytest.raises(RuntimeError, match="different plan"):
        bench.main(["--out", str(out), *TINY[:-2], "--student-iter", "8", *TINY[-2:]])


def test_read_metrics_keeps_the_resumed_records(tmp_path):
    # a run killed after iteration 7 (checkpoint at 4) and resumed: iterations 5..7 are logged twice
    lines = [{"iteration": i, "total_loss": 10.0 - i} for i in range(8)]
    lines += [{"iteration": i, "total_loss": 100.0 - i} for i in range(5, 10)]
    lines.append({"iteration": 9, "bbox/AP": 3.0})
    path = tmp_path / "metrics.json"
    path.write_text("\n".join(json.dumps(x) for x in lines) + '\n{"iteration": 1')  # torn last line
    recs = bench.read_metrics(path)
    assert [r["iteration"] for r in recs] == list(range(10))
    assert [r["total_loss"] for r in recs] == [10.0, 9.0, 8.0, 7.0, 6.0, 95.0, 94.0, 93.0, 92.0, 91.0]
    assert recs[-1]["bbox/AP"] == 3.0


def test_unknown_method_names_the_config_and_the_known_methods(tmp_path):
    with pytest.raises(FileNotFoundError, match="KD_DETR_TPRD") as err:
        bench.method_config("deformable_detr", "NoSuchMethod")
    assert "NoSuchMethod/deformable_detr_r50_distill_r18_synthetic.py" in str(err.value)


def test_results_table_gain_and_spread(tmp_path):
    teacher = {"bbox/AP": 30.0, "bbox/AP50": 50.0, "bbox/AP75": 30.0, "sec_per_iter": 1.0}
    runs = [{"method": m, "seed": s, "bbox/AP": ap, "bbox/AP50": 2 * ap, "bbox/AP75": ap, "sec_per_iter": 0.5}
            for m, s, ap in [("none", 1, 10.0), ("none", 2, 12.0), ("X", 1, 13.0), ("X", 2, 15.0)]]
    bench.write_results_md(tmp_path / "r.md", teacher, runs, bench.parse_arms("none,X", None), ["# t"])
    rows = {line.split("|")[1].strip(): line for line in (tmp_path / "r.md").read_text().splitlines()
            if line.startswith("| ") and "method" not in line}
    # mean ± sample std: (10, 12) -> 11 ± sqrt(2); (13, 15) -> 14 ± sqrt(2); gain 14 - 11 = +3
    assert "11.00 ± 1.41" in rows["none"] and "14.00 ± 1.41" in rows["X"] and "+3.00" in rows["X"]


def test_paired_statistics_per_seed(tmp_path):
    teacher = {"bbox/AP": 30.0, "bbox/AP50": 50.0, "bbox/AP75": 30.0, "sec_per_iter": 1.0}
    ap = {("none", 1): 10.0, ("none", 2): 12.0, ("none", 3): 11.0,
          ("X", 1): 13.0, ("X", 2): 11.0, ("X", 3): 14.0,
          ("X_TPRD", 1): 14.0, ("X_TPRD", 2): 12.0, ("X_TPRD", 3): 14.0,
          ("X_TPRD_sig", 1): 15.0, ("X_TPRD_sig", 2): 15.0}  # seed 3 not finished
    runs = [{"method": arm.split("_sig")[0], "arm": arm, "seed": seed, "bbox/AP": v, "bbox/AP50": v,
             "bbox/AP75": v, "sec_per_iter": 0.5} for (arm, seed), v in ap.items()]
    arms = bench.parse_arms("none,X,X_TPRD", [["X_TPRD_sig=X_TPRD", "a.b=1"]])
    # every arm vs none; X_TPRD vs X; the ablation arm vs the arm of its method (there is no X_sig arm)
    assert bench.paired_comparisons(arms) == [
        ("X", "none"), ("X_TPRD", "none"), ("X_TPRD", "X"), ("X_TPRD_sig", "none"), ("X_TPRD_sig", "X_TPRD")]
    # X - none per seed: +3, -1, +3 -> mean 5/3, sample std sqrt(((4/3)^2 + (8/3)^2 + (4/3)^2) / 2) = 2.309
    st = bench.paired_stats(runs, "X", "none")
    assert st["seeds"] == [1, 2, 3] and st["diffs"] == [3.0, -1.0, 3.0] and st["wins"] == 2
    assert abs(st["mean"] - 5 / 3) < 1e-9 and abs(st["std"] - 2.3094) < 1e-4
    # X_TPRD - X: +1, +1, 0 -> two wins, one tie
    st = bench.paired_stats(runs, "X_TPRD", "X")
    assert st["wins"] == 2 and st["ties"] == 1
    # only the seeds both arms have
    assert bench.paired_stats(runs, "X_TPRD_sig", "X_TPRD")["seeds"] == [1, 2]
    bench.write_results_md(tmp_path / "r.md", teacher, runs, arms, ["# t"])
    text = (tmp_path / "r.md").read_text()
    assert "| X − none | +1.67 ± 2.31 | 2 of 3 | +3.00 (s1), -1.00 (s2), +3.00 (s3) |" in text
    assert "| X_TPRD − X | +0.67 ± 0.58 | 2 of 3, 1 tied |" in text
    assert "| X_TPRD_sig − X_TPRD | +2.00 ± 1.41 | 2 of 2 |" in text
    assert "- `X_TPRD_sig`: `a.b=1`" in text


def test_arms_parse_and_reach_only_their_runs(tmp_path):
    with pytest.raises(ValueError, match="NAME=METHOD"):
        bench.parse_arms("none", [["DETRDistill"]])
    with pytest.raises(ValueError, match="unique"):
        bench.parse_arms("none,KD_DETR", [["KD_DETR=KD_DETR_TPRD"]])
    with pytest.raises(ValueError, match="key=value"):
        bench.parse_arms("none", [["a=KD_DETR", "oops"]])
    with pytest.raises(SystemExit):
        bench.parse_args(["--out", str(tmp_path), "--arm", "bad/name=KD_DETR"])
    args = bench.parse_args(["--out", str(tmp_path), "--methods", "KD_DETR", "train.log_period=5",
                             "--arm", "kd0=KD_DETR", "model.methods.kd_detr.weights.class=0.0"])
    assert args.overrides == ["train.log_period=5"]
    plan = bench.build_plan(args, bench.BUDGETS["quick"])
    by_name = {r.name: r for r in [plan["teacher"], *plan["runs"]]}
    assert sorted(by_name) == ["KD_DETR_seed1", "kd0_seed1", "none_seed1", "teacher"]
    arm_override = "model.methods.kd_detr.weights.class=0.0"
    assert by_name["kd0_seed1"].overrides[-1] == arm_override and by_name["kd0_seed1"].method == "KD_DETR"
    for name in ("teacher", "none_seed1", "KD_DETR_seed1"):
        assert arm_override not in by_name[name].overrides
        assert "train.log_period=5" in by_name[name].overrides  # plan-wide overrides reach every run
    # the arm's run uses the same generated method config, its own output folder
    assert by_name["kd0_seed1"].config == by_name["KD_DETR_seed1"].config
    assert by_name["kd0_seed1"].output_dir.name == "kd0_seed1"


def test_paper_budget_plan(tmp_path, monkeypatch):
    backbone = tmp_path / "r18.pth"
    monkeypatch.setattr(bench, "paper_backbone", lambda train, val: backbone)
    args = bench.parse_args(["--out", str(tmp_path / "b"), "--detector", "dino", "--budget", "paper",
                             "--methods", "DETRDistill_TPRD"])
    plan = bench.build_plan(args, bench.BUDGETS["paper"])
    teacher, none, dd = plan["teacher"], *plan["runs"][:2]
    assert plan["datasets"] == ("synthetic_paper_train", "synthetic_paper_val")
    assert f"train.init_checkpoint={backbone}" in teacher.overrides and f"train.init_checkpoint={backbone}" in none.overrides
    assert not any(o.startswith("train.init_checkpoint=") and str(backbone) in o for o in dd.overrides)
    for prefix, run in (("model.", none), ("model.student.", dd), ("model.teacher.", dd), ("model.", teacher)):
        assert f"{prefix}num_classes=24" in run.overrides
        assert f"{prefix}transformer.decoder.num_layers=6" in run.overrides
        assert f"{prefix}num_queries=40" in run.overrides
    assert "model.teacher.transformer.encoder.num_layers=3" in dd.overrides
    # pretrained backbones: frozen BN and the configs' backbone lr factor stay
    assert not any("backbone.norm=BN" in o or "lr_factor_func" in o for o in none.overrides + dd.overrides)
    assert "model.backbone.norm=FrozenBN" in none.overrides and "model.student.backbone.freeze_at=1" in dd.overrides
    # the generated config builds the 24-class, 6-stage model
    from tprd.engine.main import load_config

    cfg = load_config(str(dd.config), [o for o in dd.overrides if not o.startswith("train.init_checkpoint")])
    assert cfg.model.student.num_classes == 24 and cfg.model.teacher.transformer.decoder.num_layers == 6


def _class_counts(node, path=""):
    """Every ``...num_classes`` value of a resolved config, by its dotted path."""
    from omegaconf import DictConfig, ListConfig

    out = {}
    if isinstance(node, DictConfig):
        for key in node.keys():
            value = node[key]
            name = f"{path}.{key}" if path else str(key)
            if key == "num_classes":
                out[name] = value
            else:
                out.update(_class_counts(value, name))
    elif isinstance(node, ListConfig):
        for i, value in enumerate(node):
            out.update(_class_counts(value, f"{path}[{i}]"))
    return out


@pytest.mark.parametrize("detector", ["deformable_detr", "dino", "dab_detr"])
def test_paper_regime_sets_every_class_count(tmp_path, monkeypatch, detector):
    # every class count of every run's model (criterion and methods included) follows the paper
    # data's 24 classes; DAB-DETR's criterion once kept the synthetic base's 5 and stopped the run
    from tprd.engine.main import load_config

    monkeypatch.setattr(bench, "paper_backbone", lambda train, val: tmp_path / "r18.pth")
    args = bench.parse_args(["--out", str(tmp_path / "b"), "--detector", detector, "--budget", "paper",
                             "--methods", "KD_DETR_TPRD,DETRDistill"])
    plan = bench.build_plan(args, bench.budget_for(detector, "paper"))
    runs = [plan["teacher"], *plan["runs"]]
    assert {r.name.rsplit("_seed", 1)[0] for r in runs} >= {"teacher", "none", "KD_DETR_TPRD", "DETRDistill"}
    for run in runs:
        cfg = load_config(str(run.config), [o for o in run.overrides if not o.startswith("train.init_checkpoint")])
        counts = _class_counts(cfg.model)
        assert counts and set(counts.values()) == {24}, (run.name, counts)


RT_TINY = ["--detector", "rt_detr", "--methods", "none,KD_DETR_TPRD", "--seeds", "1", "--student-iter", "3",
           "--teacher-iter", "2", "--batch", "2", "--num-evals", "1",
           "dataloader.train.dataset.names=synthetic_train", "dataloader.test.dataset.names=synthetic_val"]


def test_tiny_rt_detr_plan_end_to_end(tmp_path, datasets):
    # RT-DETRv2 through the whole plan: teacher, init file, student alone and one method (~40 s)
    out = tmp_path / "bench"
    report = bench.main(["--out", str(out), *RT_TINY])
    data = json.loads((out / "results.json").read_text())
    assert data == json.loads(json.dumps(report))
    assert sorted((r["method"], r["seed"]) for r in data["runs"]) == [("KD_DETR_TPRD", 1), ("none", 1)]
    for r in [data["teacher"], *data["runs"]]:
        assert all(math.isfinite(r[k]) and 0.0 <= r[k] <= 100.0 for k in ("bbox/AP", "bbox/AP50", "bbox/AP75"))
    # every run went through RT-DETR's train_net with the RT-DETRv2 configs
    commands = (out / "commands.sh").read_text().splitlines()[1:]
    assert len(commands) == 3 and all("projects/rt_detr/train_net.py" in c for c in commands)
    assert "rtdetrv2_r50vd_distill_r18vd_synthetic.py" in (out / "configs" / "KD_DETR_TPRD.py").read_text()
    # the distillation run started from the trained teacher (the init file has every teacher key)
    log = (out / "runs" / "KD_DETR_TPRD_seed1" / "log.txt").read_text()
    assert "teacher complete" in log
    md = (out / "results.md").read_text()
    assert "Student R18vd" in md and "6 decoder layers vs 3" in md and "| KD_DETR_TPRD |" in md
    # RT-DETRv2's decoder samples on its own: the report does not claim a deformable-attention backend
    assert "--msda-backend does not apply" in md and "Deformable-attention backend" not in md


def test_rt_detr_plan_builds_a_deeper_teacher_and_a_fair_student(tmp_path):
    from tprd.config import instantiate
    from tprd.engine.defaults import seed_all_rng
    from tprd.engine.main import load_config

    assert bench.method_config("rt_detr", "DETRDistill_TPRD").name == "rtdetrv2_r50vd_distill_r18vd_synthetic.py"
    args = bench.parse_args(["--out", str(tmp_path), "--detector", "rt_detr", "--methods", "none,DETRDistill_TPRD",
                             "--seeds", "1"])
    plan = bench.build_plan(args, bench.budget_for("rt_detr", "full"))
    teacher, none, dd = plan["teacher"], *plan["runs"]
    assert (none.name, dd.name) == ("none_seed1", "DETRDistill_TPRD_seed1")
    assert teacher.max_iter > none.max_iter == dd.max_iter
    # RT-DETR's optimizer has no lr_factor_func (one lr already): no override may invent that key
    assert not any("lr_factor_func" in o for r in [teacher, *plan["runs"]] for o in r.overrides)

    def build(run, seed=0):
        cfg = load_config(str(run.config), [o for o in run.overrides if not o.startswith("train.init_checkpoint=")])
        seed_all_rng(seed)
        return instantiate(cfg.model)

    alone = build(teacher)
    distiller = build(dd, seed=1)
    student = build(none, seed=1)
    # the teacher trained alone is the distiller's teacher (merge_weights fills it key for key)
    t_state, d_state = alone.state_dict(), distiller.teacher.state_dict()
    assert {k: v.shape for k, v in t_state.items()} == {k: v.shape for k, v in d_state.items()}
    # teacher: 6 decoder layers vs 3, one more AIFI layer, FFN x2, the student's PResNet-18vd
    assert len(alone.decoder.decoder.layers) == 6 and len(distiller.student.decoder.decoder.layers) == 3
    assert len(alone.encoder.encoder[0].layers) == len(distiller.student.encoder.encoder[0].layers) + 1
    assert alone.backbone.depth == distiller.student.backbone.depth == 18
    assert sum(p.numel() for p in alone.parameters()) > sum(p.numel() for p in distiller.student.parameters())
    # trained from scratch: trainable BatchNorm everywhere
    assert all(p.requires_grad for p in alone.parameters()) and all(p.requires_grad for p in student.parameters())
    # same seed: the distiller's student starts as the student alone
    s_state, ds_state = student.state_dict(), distiller.student.state_dict()
    assert set(s_state) == set(ds_state) and all(torch.equal(s_state[k], ds_state[k]) for k in s_state)


def test_report_names_the_attention_each_detector_samples_with():
    assert bench._sampling_line("dino", "cpp") == "Deformable-attention backend: cpp."
    assert bench._sampling_line("deformable_detr", "auto") == "Deformable-attention backend: auto."
    for detector in ("dab_detr", "rt_detr"):  # neither uses multi-scale deformable attention
        line = bench._sampling_line(detector, "cpp")
        assert "--msda-backend does not apply" in line and "backend: cpp" not in line
    assert bench.detector_spec("dab_detr").config_name == "dab_detr_r50_distill_r18_synthetic.py"


def test_rt_detr_paper_budget_is_refused_by_name(tmp_path, capsys):
    with pytest.raises(ValueError, match="--budget paper"):
        bench.budget_for("rt_detr", "paper")
    with pytest.raises(SystemExit):
        bench.parse_args(["--out", str(tmp_path), "--detector", "rt_detr", "--budget", "paper"])
    err = capsys.readouterr().err
    assert "--budget paper" in err and "--detector rt_detr" in err and "deformable_detr" in err
    assert bench.budget_for("dino", "paper").regime == "paper"  # the DETR family keeps it


def test_dataset_option_takes_the_layouts(tmp_path):
    # --dataset names the layout (coco, voc) of every regime, not the regimes
    assert bench.parse_args(["--out", str(tmp_path), "--dataset", "voc"]).dataset == "voc"
    with pytest.raises(SystemExit):
        bench.parse_args(["--out", str(tmp_path), "--dataset", "scratch"])


def test_visualize_tprd_random_teacher(tmp_path, datasets):
    vis = _load_tool("visualize_tprd")
    from tprd.config import instantiate
    from tprd.engine.main import load_config

    config = str(REPO / "projects/deformable_detr/cfg_distill/base/deformable_detr_r50_distill_r18_synthetic.py")
    # the fixture's 4 validation images
    opts = ["train.device=cpu"]
    cfg = load_config(config, opts)
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    ckpt = tmp_path / "distiller.pth"
    torch.save({"model": model.state_dict()}, ckpt)
    result = vis.main(["--config", config, "--checkpoint", str(ckpt), "--out", str(tmp_path / "vis"),
                       "--num-images", "2", "--max-images", "4", *opts])
    assert len(result["images"]) == 2 and all(_valid_png(p) for p in result["images"])
    table = (tmp_path / "vis" / "tprd_stats.md").read_text()
    assert "TPRD on 4 images" in table
    sums = result["sums"]
    num_stages = int(cfg.model.teacher.transformer.decoder.num_layers)
    assert sums["num_positive"].numel() == num_stages
    # every stage matches each GT box once; positives + negatives = all queries of every image
    queries = int(cfg.model.teacher.num_queries)
    assert (sums["num_positive"] == sums["num_positive"][0]).all()
    assert (sums["num_positive"] + sums["num_negative"] == 4 * queries).all()
    # stage 1 has nothing earlier to borrow from; refined positives borrow from earlier stages only
    assert sums["num_positive_refined"][0] == 0 and sums["num_negative_refined"][0] == 0
    for l in range(num_stages):
        assert sums["borrowed"][l].sum() == sums["num_positive_refined"][l]
        assert (sums["borrowed"][l, l:] == 0).all()
    assert table.count("\n| ") == num_stages + 1


def test_distillation_student_starts_as_the_student_alone(tmp_path):
    # the plan's fairness claim: with the same seed, the distiller's student is built with the same
    # initial weights as the `none` run's student (build_init takes its backbone the same way)
    from tprd.config import instantiate
    from tprd.engine.defaults import seed_all_rng
    from tprd.engine.main import load_config

    args = bench.parse_args(["--out", str(tmp_path), "--methods", "none,KD_DETR_TPRD"])
    plan = bench.build_plan(args, bench.BUDGETS["quick"])
    none, kd = plan["runs"]
    seed_all_rng(1)
    alone = instantiate(load_config(str(none.config), plan["student_overrides"]).model).state_dict()
    overrides = [o for o in kd.overrides if not o.startswith("train.init_checkpoint=")]
    seed_all_rng(1)
    distilled = instantiate(load_config(str(kd.config), overrides).model).student.state_dict()
    assert set(alone) == set(distilled)
    assert all(torch.equal(alone[k], distilled[k]) for k in alone)
    # ... and the teacher is the larger model
    assert "model.teacher.transformer.encoder.num_layers=2" in kd.overrides


def test_store_continues_a_plan_elsewhere_and_jobs_run_side_by_side(tmp_path, datasets):
    # a plan run with two jobs into a store; then the same plan with a fresh --out (another machine)
    # takes every run from the store: nothing is trained again, the report is the same
    store = tmp_path / "repo" / "paper_x"
    first = bench.main(["--out", str(tmp_path / "a"), "--store", str(store), "--jobs", "2", *TINY,
                        "--arm", "kd_w0=KD_DETR_TPRD", "model.methods.kd_detr.weights.specific_class=0.0"])
    assert {(r["arm"], r["method"]) for r in first["runs"]} == {
        ("none", "none"), ("KD_DETR_TPRD", "KD_DETR_TPRD"), ("kd_w0", "KD_DETR_TPRD")}
    stored = json.loads((store / "runs" / "kd_w0_seed1" / bench.RESULT_FILE).read_text())
    assert all(str(tmp_path / "a") not in c for c in stored["command"])  # machine paths replaced
    assert "$OUT/runs/kd_w0_seed1" in " ".join(stored["command"])
    assert (store / "runs" / "kd_w0_seed1" / "metrics.json").is_file()
    summary = json.loads(store.with_suffix(".json").read_text())
    assert sorted(r["arm"] for r in summary["runs"]) == ["KD_DETR_TPRD", "kd_w0", "none"]
    assert summary["teacher"]["bbox/AP"] == first["teacher"]["bbox/AP"]

    second = bench.main(["--out", str(tmp_path / "b"), "--store", str(store), *TINY,
                         "--arm", "kd_w0=KD_DETR_TPRD", "model.methods.kd_detr.weights.specific_class=0.0"])
    assert not (tmp_path / "b" / "teacher" / "model_final.pth").exists()  # no teacher retrained
    assert not list((tmp_path / "b" / "runs").glob("*/log.txt"))  # no run trained
    key = lambda r: (r["arm"], r["seed"])  # noqa: E731
    assert [(key(r), r["bbox/AP"]) for r in second["runs"]] == [(key(r), r["bbox/AP"]) for r in first["runs"]]
    # a plan whose command differs from the stored one is refused, naming the store
    with pytest.raises(RuntimeError, match="stored by a different plan"):
        bench.main(["--out", str(tmp_path / "c"), "--store", str(store), *TINY, "train.log_period=3"])


def test_machine_fingerprint_and_the_warning_before_a_doomed_teacher():
    here = bench.machine_fingerprint()
    assert here == bench.machine_fingerprint()  # deterministic on one machine
    assert set(here) == {"torch", "cpu_capability", "numeric"} and len(here["numeric"]) == 16
    assert bench.machine_warning(None, here) is None  # nothing stored yet
    assert bench.machine_warning({"bbox/AP": 1.0}, here) is None  # stored before fingerprints existed
    assert bench.machine_warning({"machine": dict(here)}, here) is None
    other = dict(here, numeric="0123456789abcdef", cpu_capability="AVX2")
    warning = bench.machine_warning({"machine": other}, here)
    assert "another machine" in warning and "0123456789abcdef" in warning and here["numeric"] in warning
    assert "new --store" in warning


def test_a_machine_whose_teacher_differs_keeps_it_for_a_new_store(tmp_path, datasets):
    """The numbers depend on the CPU: a machine whose retrained teacher differs from the stored one
    stops, takes the runs it copied from the store out of its --out again, and keeps its teacher for
    a new store, where every run is trained on this machine; a finished run in --out distilled from
    another teacher is refused by name."""
    store = tmp_path / "repo" / "paper_x"
    bench.main(["--out", str(tmp_path / "a"), "--store", str(store), *TINY])
    # the store as another machine left it: its teacher scored otherwise, one distillation run to do
    teacher_file = store / "teacher" / bench.RESULT_FILE
    stored = json.loads(teacher_file.read_text())
    stored["bbox/AP"] += 1.0
    teacher_file.write_text(json.dumps(stored))
    shutil.rmtree(store / "runs" / "KD_DETR_TPRD_seed1")
    out = tmp_path / "b"
    with pytest.raises(RuntimeError, match="teacher trained here differs"):
        bench.main(["--out", str(out), "--store", str(store), *TINY])
    assert (out / "teacher" / "model_final.pth").is_file()
    assert not (out / "runs" / "none_seed1").exists()  # copied from the store, then taken out again
    teacher_weights = (out / "teacher" / "model_final.pth").stat().st_mtime_ns
    second = bench.main(["--out", str(out), "--store", str(tmp_path / "repo" / "paper_x_machine2"), *TINY])
    assert (out / "teacher" / "model_final.pth").stat().st_mtime_ns == teacher_weights  # kept, not retrained
    for name in ("none_seed1", "KD_DETR_TPRD_seed1"):
        assert (out / "runs" / name / "log.txt").is_file(), name  # trained here
    kd = next(r for r in second["runs"] if r["method"] == "KD_DETR_TPRD")
    assert kd[bench.TEACHER_AP] == second["teacher"]["bbox/AP"] != stored["bbox/AP"]
    # the teacher trained before this store was given is stored with its runs
    machine2 = json.loads((tmp_path / "repo" / "paper_x_machine2" / "teacher" / bench.RESULT_FILE).read_text())
    assert machine2["bbox/AP"] == second["teacher"]["bbox/AP"]
    # this --out's teacher against the first machine's store: refused, nothing of the store left behind
    with pytest.raises(RuntimeError, match="teacher trained here differs"):
        bench.main(["--out", str(tmp_path / "b"), "--store", str(store), *TINY])
    result_file = out / "runs" / "KD_DETR_TPRD_seed1" / bench.RESULT_FILE
    result = json.loads(result_file.read_text())
    result[bench.TEACHER_AP] += 1.0
    result_file.write_text(json.dumps(result))
    with pytest.raises(RuntimeError, match="distilled from another teacher"):
        bench.main(["--out", str(out), *TINY])


def test_a_failure_or_a_stop_ends_a_plan_running_side_by_side():
    """--jobs 2: the first failed run ends the plan at once -- the run in flight stops (it would
    resume next time) and queued runs never start -- and the failure is what the caller sees."""
    import threading

    started, stopped = [], []

    def one(run):
        started.append(run)
        if run == "fails":
            time.sleep(0.2)
            raise RuntimeError("run 'fails' failed")
        # a training in flight: execute() ends it when the plan stops
        if bench.STOP.wait(30.0):
            stopped.append(run)
            raise RuntimeError("stopped with the plan")

    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="run 'fails' failed"):
        bench.run_side_by_side(["long", "fails", "queued1", "queued2"], one, jobs=2)
    assert time.monotonic() - t0 < 10.0
    assert started == ["long", "fails"] and stopped == ["long"]
    assert not bench.STOP.is_set()  # the next plan in this process starts clean

    # a stop of the benchmark itself (SIGTERM -> SystemExit in the main thread) stops the runs too
    stopped.clear()
    timer = threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGUSR1))
    previous = signal.signal(signal.SIGUSR1, lambda *a: sys.exit(128 + signal.SIGTERM))
    try:
        timer.start()
        with pytest.raises(SystemExit):
            bench.run_side_by_side(["a", "b", "c"], one, jobs=2)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert sorted(stopped) == ["a", "b"]


def test_execute_ends_its_training_when_the_plan_stops(tmp_path, monkeypatch):
    run = bench.Run("none_seed1", "none", 1, tmp_path / "cfg.py", [], 10, tmp_path / "run")
    monkeypatch.setattr(bench.Run, "command", lambda self, det: [sys.executable, "-c", "import time; time.sleep(60)"])

    class Bar:
        def update(self, n):
            pass

    timer = __import__("threading").Timer(0.5, bench.STOP.set)
    t0 = time.monotonic()
    timer.start()
    try:
        with pytest.raises(RuntimeError, match="stopped with the plan; it resumes"):
            bench.execute(run, "dino", dict(os.environ), Bar())
    finally:
        bench.STOP.clear()
    assert time.monotonic() - t0 < 10.0
