"""Training engine: trainer loop, hooks, checkpointing, resume, NaN handling, eval-only, DDP, overrides.

Everything runs the real entry point (``tprd.engine.main.main``) on a tiny dummy detector and a
tiny dummy dataset defined here, so each run takes a second or two on a CPU.
"""
import json
import logging
import os
import subprocess
import sys
import textwrap
from argparse import Namespace
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tprd.checkpoint.detrex import DetrexAdapter
from tprd.data import DatasetCatalog, MetadataCatalog
from tprd.engine import comm
from tprd.engine.checkpoint import DetectionCheckpointer
from tprd.engine.events import get_event_storage
from tprd.engine.launch import launch
from tprd.engine.main import main
from tprd.engine.optim import deformable_lr_factor, get_default_optimizer_params
from tprd.engine.trainer import SimpleTrainer

REPO = Path(__file__).resolve().parents[1]
THIS = __name__  # importable module name of this file (configs refer to the classes below)

# --------------------------------------------------------------------------------------------
# Dummy data: a bright rectangle on a dark 16x16 image; the box is the rectangle.
# --------------------------------------------------------------------------------------------
SIZES = {"dummy_a": 16, "dummy_b": 12}


def dummy_records(name):
    rng = np.random.default_rng(SIZES[name] * 7 + (0 if name == "dummy_a" else 1))
    records = []
    for i in range(SIZES[name]):
        img = rng.integers(0, 40, size=(3, 16, 16)).astype(np.uint8)
        x0, y0 = rng.integers(0, 8, size=2)
        w, h = rng.integers(4, 8, size=2)
        img[:, y0 : y0 + h, x0 : x0 + w] = 220
        records.append(
            {
                "image": torch.from_numpy(img),
                "height": 16,
                "width": 16,
                "image_id": i,
                "gt_boxes": torch.tensor([[x0, y0, x0 + w, y0 + h]], dtype=torch.float32),
                "gt_classes": torch.tensor([0]),
                "iscrowd": [0],
            }
        )
    return records


for _name in SIZES:
    if _name not in DatasetCatalog:
        DatasetCatalog.register(_name, (lambda n: lambda: dummy_records(n))(_name))
    MetadataCatalog.get(_name).set(thing_classes=["rect"])


class DummyDetector(nn.Module):
    """Predicts one box and class score per image. ``nan_at`` / ``interrupt_at``: the n-th training
    forward returns a NaN class loss (on rank ``nan_rank``; -1: all) / raises KeyboardInterrupt
    (1-based; 0 = never)."""

    def __init__(self, num_classes=1, hidden=16, nan_at=0, interrupt_at=0, nan_rank=-1):
        super().__init__()
        self.num_classes = num_classes
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
        self.norm = nn.LayerNorm(32)
        self.box_head = nn.Sequential(nn.Linear(32, hidden), nn.ReLU(), nn.Linear(hidden, 4))
        self.class_head = nn.Linear(32, num_classes)
        self.nan_at, self.interrupt_at, self.nan_rank = nan_at, interrupt_at, nan_rank
        self.calls = 0

    @property
    def device(self):
        return self.class_head.weight.device

    def forward(self, batched_inputs):
        x = torch.stack([b["image"] for b in batched_inputs]).to(self.device).float() / 255.0
        f = self.norm(self.backbone(x).flatten(1))
        cxcywh = self.box_head(f).sigmoid()
        boxes = torch.cat([cxcywh[:, :2] - cxcywh[:, 2:] / 2, cxcywh[:, :2] + cxcywh[:, 2:] / 2], dim=1)
        logits = self.class_head(f)
        if not self.training:
            return [
                {"boxes": boxes[i : i + 1] * 16.0, "scores": logits[i].sigmoid().max(0, keepdim=True)[0],
                 "labels": torch.zeros(1, dtype=torch.long)}
                for i in range(len(batched_inputs))
            ]
        self.calls += 1
        if self.calls == self.interrupt_at:
            raise KeyboardInterrupt("simulated Ctrl-C")
        gt = torch.cat([b["gt_boxes"] for b in batched_inputs]).to(self.device) / 16.0
        target = torch.zeros_like(logits)
        target[:, 0] = 1.0
        loss_class = nn.functional.binary_cross_entropy_with_logits(logits, target)
        if self.calls == self.nan_at and self.nan_rank in (-1, comm.get_rank()):
            loss_class = loss_class * float("nan")
        get_event_storage().put_scalar("batch_per_rank", len(batched_inputs), smoothing_hint=False)
        return {"loss_class": loss_class, "loss_bbox": 5.0 * (boxes - gt).abs().mean()}


class DummyEvaluator:
    """AP = 100 * mean over IoU thresholds .50:.05:.95 of the fraction of images whose box hits."""

    def __init__(self, dataset_name):
        self.records = {r["image_id"]: r for r in dummy_records(dataset_name)}

    def reset(self):
        self.ious = []

    def process(self, inputs, outputs):
        from torchvision.ops import box_iou

        for inp, out in zip(inputs, outputs):
            gt = self.records[inp["image_id"]]["gt_boxes"]
            self.ious.append(float(box_iou(out["boxes"].cpu(), gt)[0, 0]))

    def evaluate(self):
        ious = sum(comm.all_gather(self.ious), [])
        if not comm.is_main_process():
            return {}
        ious = np.array(ious)
        ap = np.mean([(ious >= t).mean() for t in np.arange(0.5, 0.96, 0.05)]) * 100
        return {"bbox": {"AP": float(ap), "AP50": float((ious >= 0.5).mean() * 100), "mIoU": float(ious.mean()),
                         "num_images": len(ious)}}


CONFIG = """
from fvcore.common.param_scheduler import MultiStepParamScheduler

from tprd.config import LazyCall as L, get_config
from tprd.data import build_detection_test_loader, build_detection_train_loader, get_detection_dataset
from tprd.engine.lr_scheduler import WarmupParamScheduler
from {mod} import DummyDetector, DummyEvaluator

train = get_config("common/train.py").train
train.output_dir = "{out}"
train.device = "cpu"
train.max_iter = 40
train.eval_period = 20
train.log_period = 1
train.checkpointer = dict(period=1000, max_to_keep=3)

model = L(DummyDetector)(num_classes=1, nan_at=0, interrupt_at=0, nan_rank=-1)

optimizer = get_config("common/optim.py").AdamW
optimizer.lr = 3e-3

lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(values=[1.0, 0.1], milestones=[30, 40]),
    warmup_length=0.1,
    warmup_factor=0.1,
)

dataloader = dict(
    train=L(build_detection_train_loader)(
        dataset=L(get_detection_dataset)(names="dummy_a", filter_empty=False),
        mapper=None, total_batch_size=4, num_workers=0, seed=0, aspect_ratio_grouping=False,
    ),
    test=L(build_detection_test_loader)(
        dataset=L(get_detection_dataset)(names="dummy_a", filter_empty=False),
        mapper=None, batch_size=4,
    ),
    evaluator=L(DummyEvaluator)(dataset_name="${{..test.dataset.names}}"),
)
"""


def write_config(tmp_path, out):
    path = tmp_path / "dummy_cfg.py"
    path.write_text(CONFIG.format(mod=THIS, out=out))
    return str(path)


def make_args(config_file, *opts, resume=False, eval_only=False, num_gpus=1):
    return Namespace(config_file=config_file, resume=resume, eval_only=eval_only, num_gpus=num_gpus,
                     num_machines=1, machine_rank=0, dist_url="auto", opts=list(opts))


def read_metrics(out):
    with open(os.path.join(out, "metrics.json")) as f:
        return [json.loads(line) for line in f if line.strip()]


def series(records, key):
    return {r["iteration"]: r[key] for r in records if key in r}


def ckpt_files(out):
    return sorted(p.name for p in Path(out).glob("*.pth"))


# --------------------------------------------------------------------------------------------
# End-to-end runs of the entry point
# --------------------------------------------------------------------------------------------
def test_short_run_loss_falls_and_eval_writes_metrics(tmp_path):
    out = str(tmp_path / "run")
    results = main(make_args(write_config(tmp_path, out)))
    records = read_metrics(out)
    loss = series(records, "total_loss")
    assert sorted(loss) == list(range(40))
    first = np.mean([loss[i] for i in range(3)])
    last = np.mean([loss[i] for i in range(37, 40)])
    assert last < 0.7 * first, (first, last)
    # one line per iteration, as detectron2 writes it: the evaluations (periodic, and the final one
    # put after the last line was written) are in the line of their iteration
    assert [r["iteration"] for r in records] == list(range(40))
    ap = series(records, "bbox/AP")
    assert sorted(ap) == [19, 39]  # eval_period 20 and after the last iteration
    assert "total_loss" in records[39] and "bbox/AP" in records[39]
    assert ap[39] == pytest.approx(results["bbox"]["AP"])
    lr = series(records, "lr")
    assert lr[0] == pytest.approx(3e-4 + (3e-3 - 3e-4) * 0 / 4)  # warmup from 0.1x
    assert lr[10] == pytest.approx(3e-3) and lr[35] == pytest.approx(3e-4)
    assert sorted(series(records, "time")) == list(range(40))
    for name in ("log.txt", "config.yaml", "model_final.pth", "last_checkpoint"):
        assert os.path.isfile(os.path.join(out, name)), name
    assert list(Path(out).glob("events.out.tfevents.*"))
    log = Path(out, "log.txt").read_text()
    assert "eta:" in log and "iter: 39/40" in log and "copypaste: AP,AP50" in log
    ckpt = torch.load(os.path.join(out, "model_final.pth"), weights_only=False)
    assert ckpt["iteration"] == 39 and {"model", "optimizer", "scheduler"} <= set(ckpt)


def test_eval_only_reproduces_final_evaluation(tmp_path):
    out = str(tmp_path / "run")
    cfg = write_config(tmp_path, out)
    trained = main(make_args(cfg, "train.max_iter=12", "train.eval_period=0"))
    final = os.path.join(out, "model_final.pth")
    elsewhere = f"train.output_dir={tmp_path / 'ev'}"
    evaluated = main(make_args(cfg, f"train.init_checkpoint={final}", elsewhere, eval_only=True))
    assert evaluated["bbox"] == pytest.approx(trained["bbox"])
    # --resume picks model_final from the output folder without init_checkpoint
    resumed = main(make_args(cfg, "train.max_iter=12", resume=True, eval_only=True))
    assert resumed["bbox"] == pytest.approx(trained["bbox"])
    # a fresh model gives a different result (the checkpoint was really loaded above)
    fresh = main(make_args(cfg, elsewhere, eval_only=True))
    assert fresh["bbox"]["mIoU"] != pytest.approx(trained["bbox"]["mIoU"])


def test_resume_after_interrupt_matches_uninterrupted_run(tmp_path):
    common = ["train.max_iter=10", "train.eval_period=0", "train.checkpointer.period=4",
              "dataloader.train.dataset.names=dummy_b"]
    ref_out = str(tmp_path / "ref")
    main(make_args(write_config(tmp_path, ref_out), *common))

    out = str(tmp_path / "cut")
    cfg = write_config(tmp_path, out)
    with pytest.raises(KeyboardInterrupt):
        # the 7th training forward (iteration 6) is interrupted; the checkpoint of iteration 3 exists
        main(make_args(cfg, *common, "model.interrupt_at=7"))
    assert ckpt_files(out) == ["model_0000003.pth"]
    assert Path(out, "last_checkpoint").read_text() == "model_0000003.pth"
    saved = torch.load(os.path.join(out, "model_0000003.pth"), weights_only=False)
    assert saved["iteration"] == 3 and saved["scheduler"]["last_epoch"] == 4

    main(make_args(cfg, *common, resume=True))
    # the resumed run starts at iteration 4 ...
    log = Path(out, "log.txt").read_text()
    assert "Resumed at iteration 4 of 10" in log
    # ... with exactly the saved model, optimizer state and lrs
    model = DummyDetector()
    optimizer = torch.optim.AdamW(get_default_optimizer_params(model, base_lr=1.0, lr_factor_func=deformable_lr_factor))
    ck = DetectionCheckpointer(model, out, optimizer=optimizer)
    Path(out, "last_checkpoint").write_text("model_0000003.pth")
    extra = ck.resume_or_load("", resume=True)
    assert extra["iteration"] == 3
    state = optimizer.state_dict()
    for k, v in saved["optimizer"]["state"].items():
        for name, t in v.items():
            assert torch.equal(torch.as_tensor(state["state"][k][name]), torch.as_tensor(t)), (k, name)
    assert [g["lr"] for g in state["param_groups"]] == [g["lr"] for g in saved["optimizer"]["param_groups"]]
    for k, t in saved["model"].items():
        assert torch.equal(model.state_dict()[k], t)


def uninterrupted_and_resumed(tmp_path, common, interrupt_at):
    """Train ``common`` once straight through ("ref") and once interrupted at the ``interrupt_at``-th
    forward and resumed ("cut"). Returns the straight run's evaluation results, both final
    checkpoints and the resumed run's folder."""
    ref_out = str(tmp_path / "ref")
    results = main(make_args(write_config(tmp_path, ref_out), *common))
    out = str(tmp_path / "cut")
    cfg = write_config(tmp_path, out)
    with pytest.raises(KeyboardInterrupt):
        main(make_args(cfg, *common, f"model.interrupt_at={interrupt_at}"))
    main(make_args(cfg, *common, resume=True))
    ref = torch.load(os.path.join(ref_out, "model_final.pth"), weights_only=False)
    got = torch.load(os.path.join(out, "model_final.pth"), weights_only=False)
    return results, ref, got, out


@pytest.mark.parametrize("names", ["dummy_one", "dummy_a"])
def test_resume_continues_identically(tmp_path, names):
    # A resumed run reproduces the uninterrupted one exactly (model, optimizer moments, lr schedule,
    # iteration): with one repeated image, and with a shuffled stream of different batches, which
    # the resumed run continues where the interrupted one stopped.
    common = ["train.max_iter=10", "train.eval_period=0", "train.checkpointer.period=4",
              f"dataloader.train.dataset.names={names}",
              f"dataloader.train.total_batch_size={1 if names == 'dummy_one' else 4}"]
    _, ref, got, out = uninterrupted_and_resumed(tmp_path, common, interrupt_at=6)
    for k in ref["model"]:
        torch.testing.assert_close(got["model"][k], ref["model"][k], rtol=0, atol=1e-6)
    assert got["scheduler"] == ref["scheduler"]
    # metrics.json holds every iteration once: 0..5 from the first run (interrupted at 5), 4..9 again
    its = [r["iteration"] for r in read_metrics(out) if "total_loss" in r]
    assert its == list(range(5)) + list(range(4, 10))


DatasetCatalog.register("dummy_one", lambda: dummy_records("dummy_a")[:1]) if "dummy_one" not in DatasetCatalog else None
MetadataCatalog.get("dummy_one").set(thing_classes=["rect"])


def test_nan_loss_stops_and_saves_nothing(tmp_path):
    out = str(tmp_path / "run")
    cfg = write_config(tmp_path, out)
    with pytest.raises(FloatingPointError) as info:
        main(make_args(cfg, "train.checkpointer.period=2", "model.nan_at=6"))
    msg = str(info.value)
    assert "iteration 5" in msg and "loss_class" in msg and "loss_bbox" not in msg
    assert ckpt_files(out) == ["model_0000001.pth", "model_0000003.pth"]
    assert Path(out, "last_checkpoint").read_text() == "model_0000003.pth"
    ck = torch.load(os.path.join(out, "model_0000003.pth"), weights_only=False)
    assert all(torch.isfinite(v).all() for v in ck["model"].values())
    assert max(series(read_metrics(out), "total_loss")) <= 4


# --------------------------------------------------------------------------------------------
# Checkpointer
# --------------------------------------------------------------------------------------------
def _tiny_checkpointer(out):
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, DetectionCheckpointer(model, str(out), optimizer=opt)


def test_atomic_save_interrupted_in_process(tmp_path, monkeypatch):
    model, ck = _tiny_checkpointer(tmp_path)
    ck.save("model_0000000", iteration=0)
    good = torch.load(tmp_path / "model_0000000.pth", weights_only=False)

    def partial_save(obj, f, *a, **k):
        f.write(b"PARTIAL" * 100)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", partial_save)
    with torch.no_grad():
        model.weight.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        ck.save("model_0000001", iteration=1)
    with pytest.raises(KeyboardInterrupt):
        ck.save("model_0000000", iteration=5)  # overwriting an existing name must keep the old one
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000000.pth"]  # no temp files
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000000.pth"
    again = torch.load(tmp_path / "model_0000000.pth", weights_only=False)
    assert again["iteration"] == 0 and torch.equal(again["model"]["weight"], good["model"]["weight"])


def test_atomic_save_survives_sigkill(tmp_path):
    # A real kill (no cleanup code runs) in the middle of writing a checkpoint.
    script = textwrap.dedent(
        f"""
        import os, signal, torch
        from torch import nn
        from tprd.engine.checkpoint import DetectionCheckpointer
        ck = DetectionCheckpointer(nn.Linear(3, 2), {str(tmp_path)!r})
        ck.save("model_0000000", iteration=0)
        real = torch.save
        def dying_save(obj, f, *a, **k):
            f.write(b"x" * 4096); f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = dying_save
        ck.save("model_0000001", iteration=1)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == ["model_0000000.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000000.pth"
    model, ck = _tiny_checkpointer(tmp_path)
    assert ck.resume_or_load("", resume=True)["iteration"] == 0


def test_last_checkpoint_pointing_to_missing_file_falls_back(tmp_path):
    model, ck = _tiny_checkpointer(tmp_path)
    ck.save("model_0000004", iteration=4)
    (tmp_path / "last_checkpoint").write_text("model_0000009.pth")
    assert ck.get_checkpoint_file() == str(tmp_path / "model_0000004.pth")
    assert ck.resume_or_load("", resume=True)["iteration"] == 4


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_init_checkpoint_loads_non_strictly_with_report(tmp_path):
    src = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    torch.save({"model": {"0.weight": torch.ones(2, 3), "0.bias": torch.zeros(2), "extra.w": torch.ones(1)}},
               tmp_path / "init.pth")
    ck = DetectionCheckpointer(src, str(tmp_path / "out"))
    handler = _Records()
    logging.getLogger("tprd.checkpoint").addHandler(handler)
    try:
        extra = ck.resume_or_load(str(tmp_path / "init.pth"), resume=True)  # nothing to resume
    finally:
        logging.getLogger("tprd.checkpoint").removeHandler(handler)
    assert "iteration" not in extra
    assert torch.equal(src[0].weight, torch.ones(2, 3))
    text = "\n".join(handler.lines)
    assert "Loaded 2 of 4 model tensors" in text
    assert "missing by module: 1 2; unexpected by module: extra 1" in text
    # .pkl files (pickled numpy state dicts) load too
    import pickle

    with open(tmp_path / "init.pkl", "wb") as f:
        pickle.dump({"model": {"1.weight": np.full((2, 2), 3.0, dtype=np.float32)}}, f)
    ck.resume_or_load(str(tmp_path / "init.pkl"), resume=False)
    assert torch.equal(src[1].weight, torch.full((2, 2), 3.0))
    with pytest.raises(FileNotFoundError, match="init_checkpoint"):
        ck.resume_or_load(str(tmp_path / "missing.pth"), resume=False)


def test_max_to_keep_prunes_old_periodic_checkpoints(tmp_path):
    out = str(tmp_path / "run")
    main(make_args(write_config(tmp_path, out), "train.max_iter=12", "train.eval_period=0",
                   "train.checkpointer.period=2", "train.checkpointer.max_to_keep=2"))
    assert ckpt_files(out) == ["model_0000007.pth", "model_0000009.pth", "model_final.pth"]


# --------------------------------------------------------------------------------------------
# Trainer pieces
# --------------------------------------------------------------------------------------------
def test_gradient_clipping_bounds_the_global_norm():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    before = [p.detach().clone() for p in model.parameters()]

    class Loss(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, data):
            return {"loss": 100.0 * self.m(data[0]).pow(2).sum()}

    data = [torch.randn(5, 4)]
    trainer = SimpleTrainer(Loss(model), iter(lambda: data, None), torch.optim.SGD(model.parameters(), lr=1.0),
                            clip_grad_params={"max_norm": 0.01, "norm_type": 2.0})
    trainer.train(0, 1)
    step = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
    assert step.norm() == pytest.approx(0.01, rel=1e-4)  # SGD lr 1: the step is the clipped gradient
    grad_norm = trainer.storage.history("grad_norm").latest()
    assert grad_norm > 1.0  # the unclipped norm is recorded


def test_optimizer_param_groups_follow_lr_factors():
    model = nn.Module()
    model.backbone = nn.Linear(2, 2)
    model.decoder = nn.Module()
    model.decoder.sampling_offsets = nn.Linear(2, 2)
    model.decoder.reference_points = nn.Linear(2, 2)
    model.decoder.proj = nn.Linear(2, 2)
    model.decoder.norm = nn.LayerNorm(2)
    model.frozen = nn.Linear(2, 2).requires_grad_(False)
    groups = get_default_optimizer_params(model, base_lr=2e-4, weight_decay=1e-4, weight_decay_norm=0.0,
                                          lr_factor_func=deformable_lr_factor)
    lookup = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        for p in g["params"]:
            lookup[names[id(p)]] = (g["lr"], g["weight_decay"])
    assert lookup["backbone.weight"] == (pytest.approx(2e-5), 1e-4)
    assert lookup["decoder.sampling_offsets.bias"] == (pytest.approx(2e-5), 1e-4)
    assert lookup["decoder.reference_points.weight"] == (pytest.approx(2e-5), 1e-4)
    assert lookup["decoder.proj.weight"] == (2e-4, 1e-4)
    assert lookup["decoder.norm.weight"] == (2e-4, 0.0)
    assert "frozen.weight" not in lookup
    assert len(groups) == 3  # merged by equal settings


def test_num_classes_mismatch_is_a_clear_error(tmp_path):
    out = str(tmp_path / "run")
    with pytest.raises(ValueError, match=r"model.num_classes=1"):
        main(make_args(write_config(tmp_path, out), "model.num_classes=3"))


def test_cuda_device_without_cuda_is_a_clear_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    out = str(tmp_path / "run")
    with pytest.raises(RuntimeError, match="train.device=cpu"):
        main(make_args(write_config(tmp_path, out), "train.device=cuda"))


# --------------------------------------------------------------------------------------------
# Overrides of the documented paths
# --------------------------------------------------------------------------------------------
def test_documented_overrides_take_effect(tmp_path):
    base = write_config(tmp_path, str(tmp_path / "unused"))
    out = str(tmp_path / "over")
    # init checkpoint with recognisable weights; lr 0 keeps them through training
    init_model = DummyDetector()
    with torch.no_grad():
        init_model.class_head.bias.fill_(1.25)
    torch.save({"model": init_model.state_dict()}, tmp_path / "init.pth")
    main(make_args(
        base,
        f"train.output_dir={out}", "train.max_iter=5", "train.eval_period=2",
        "train.checkpointer.period=3", "train.amp.enabled=True", "train.amp.dtype=bfloat16",
        "train.clip_grad.enabled=False", "train.seed=7", "train.device=cpu",
        f"train.init_checkpoint={tmp_path / 'init.pth'}", "optimizer.lr=0.0",
        "dataloader.train.total_batch_size=2", "dataloader.train.dataset.names=dummy_b",
        "dataloader.test.dataset.names=dummy_b",
    ))
    records = read_metrics(out)
    assert sorted(series(records, "total_loss")) == list(range(5))                  # max_iter
    assert sorted(series(records, "bbox/AP")) == [1, 3, 4]                          # eval_period
    assert set(series(records, "bbox/num_images").values()) == {SIZES["dummy_b"]}   # test names
    assert set(series(records, "batch_per_rank").values()) == {2}                   # batch size
    assert "grad_norm" not in {k for r in records for k in r}                       # clip off
    assert ckpt_files(out) == ["model_0000002.pth", "model_final.pth"]              # period
    final = torch.load(os.path.join(out, "model_final.pth"), weights_only=False)
    assert torch.all(final["model"]["class_head.bias"] == 1.25)                     # init ckpt
    assert "Random seed: 7" in Path(out, "log.txt").read_text()                   # seed (+ rank 0)
    cfg_saved = Path(out, "config.yaml").read_text()
    assert "dummy_b" in cfg_saved and "bfloat16" in cfg_saved

    # training-set names reach the loader: dummy_a and dummy_b give different first losses, and
    # the seed changes the initial weights
    def first_loss(*opts):
        o = str(tmp_path / f"r{len(os.listdir(tmp_path))}")
        main(make_args(base, f"train.output_dir={o}", "train.max_iter=1", "train.eval_period=0", *opts))
        return series(read_metrics(o), "total_loss")[0]

    a = first_loss("train.seed=3")
    assert first_loss("train.seed=3") == pytest.approx(a)
    assert first_loss("train.seed=4") != pytest.approx(a)
    assert first_loss("train.seed=3", "dataloader.train.dataset.names=dummy_b") != pytest.approx(a)


def test_fp16_amp_saves_grad_scaler_state(tmp_path):
    out = str(tmp_path / "run")
    main(make_args(write_config(tmp_path, out), "train.max_iter=3", "train.eval_period=0", "train.amp.enabled=True"))
    final = torch.load(os.path.join(out, "model_final.pth"), weights_only=False)
    assert "scaler" in final and "scale" in final["scaler"]


# --------------------------------------------------------------------------------------------
# Two processes (gloo) vs one process
# --------------------------------------------------------------------------------------------
def test_two_process_run_matches_single_process(tmp_path):
    opts = ["train.max_iter=8", "train.eval_period=4", "dataloader.train.total_batch_size=4"]
    single = str(tmp_path / "single")
    cfg = write_config(tmp_path, single)
    main(make_args(cfg, *opts))
    double = str(tmp_path / "double")
    args = make_args(cfg, *opts, f"train.output_dir={double}", num_gpus=2)
    launch(main, 2, args=(args,))
    a, b = read_metrics(single), read_metrics(double)
    for key in ("total_loss", "loss_class", "loss_bbox"):
        sa, sb = series(a, key), series(b, key)
        assert sorted(sa) == sorted(sb) == list(range(8))
        for i in sa:
            assert sb[i] == pytest.approx(sa[i], rel=1e-5, abs=1e-6), (key, i)
    assert set(series(b, "batch_per_rank").values()) == {2}
    assert series(b, "bbox/AP") == pytest.approx(series(a, "bbox/AP"))
    assert series(b, "bbox/num_images") == series(a, "bbox/num_images")  # gathered over both ranks
    ma = torch.load(os.path.join(single, "model_final.pth"), weights_only=False)["model"]
    mb = torch.load(os.path.join(double, "model_final.pth"), weights_only=False)["model"]
    for k in ma:
        torch.testing.assert_close(mb[k], ma[k], rtol=1e-4, atol=1e-5)
    assert Path(double, "log.txt.rank1").is_file()


class DetrexNamedDummy(nn.Module):
    """A model whose detrex checkpoints name ``head.*`` as ``class_embed.*`` (its adapter says so)."""

    family = "detrex_named_dummy"

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(3, 2)
        self.other = nn.Linear(2, 2)


class DetrexNamedDummyAdapter(DetrexAdapter):
    name = "dummy"
    model_class = DetrexNamedDummy

    def to_ours(self, state_dict):
        return {k.replace("class_embed.", "head."): v for k, v in state_dict.items()}


@pytest.fixture
def dummy_adapter(monkeypatch):
    """The dummy's adapter in the registry for one test (the way a new detector registers)."""
    from tprd.checkpoint import detrex

    monkeypatch.setitem(detrex.ADAPTERS, DetrexNamedDummy.family, DetrexNamedDummyAdapter())


def test_init_checkpoint_in_detrex_naming_is_converted(tmp_path, dummy_adapter):
    model = DetrexNamedDummy()
    torch.save({"model": {"class_embed.weight": torch.full((2, 3), 2.0), "class_embed.bias": torch.ones(2)}},
               tmp_path / "detrex.pth")
    DetectionCheckpointer(model, str(tmp_path / "out")).resume_or_load(str(tmp_path / "detrex.pth"), resume=False)
    assert torch.equal(model.head.weight, torch.full((2, 3), 2.0)) and torch.equal(model.head.bias, torch.ones(2))
    # a checkpoint in the model's own naming (e.g. written by this toolbox) loads as it is
    own = DetrexNamedDummy()
    with torch.no_grad():
        own.other.weight.fill_(4.0)
    torch.save({"model": own.state_dict(), "iteration": 9}, tmp_path / "own.pth")
    DetectionCheckpointer(model, str(tmp_path / "out")).resume_or_load(str(tmp_path / "own.pth"), resume=False)
    assert torch.equal(model.other.weight, torch.full((2, 2), 4.0)) and torch.equal(model.head.weight, own.head.weight)


def test_init_checkpoint_of_a_backbone_alone_goes_into_the_backbone(tmp_path):
    model = DummyDetector()
    backbone_sd = {k: torch.full_like(v, 0.5) for k, v in model.backbone.state_dict().items()}
    backbone_sd["fc.weight"] = torch.ones(10, 3)  # an ImageNet classifier is dropped
    torch.save(backbone_sd, tmp_path / "imagenet.pth")
    head_before = model.box_head[0].weight.clone()
    DetectionCheckpointer(model, "").resume_or_load(str(tmp_path / "imagenet.pth"), resume=False)
    assert all(torch.all(v == 0.5) for v in model.backbone.state_dict().values())
    assert torch.equal(model.box_head[0].weight, head_before)


def test_nan_on_one_rank_stops_every_rank(tmp_path):
    # rank 1 alone sees the NaN; rank 0 must stop too instead of waiting in the backward all-reduce
    out = str(tmp_path / "run")
    args = make_args(write_config(tmp_path, out), "train.checkpointer.period=2", "model.nan_at=4",
                     "model.nan_rank=1", num_gpus=2)
    with pytest.raises(Exception) as info:
        launch(main, 2, args=(args,), timeout=timedelta(seconds=90))  # a hang would end as a timeout
    assert "FloatingPointError" in str(info.value) and "iteration 3" in str(info.value)
    assert ckpt_files(out) == ["model_0000001.pth"]


def test_started_by_torchrun_initialises_from_the_environment(tmp_path):
    opts = ["train.max_iter=6", "train.eval_period=0", "dataloader.train.total_batch_size=4"]
    single = str(tmp_path / "single")
    cfg = write_config(tmp_path, single)
    main(make_args(cfg, *opts))
    double = str(tmp_path / "torchrun")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(REPO / "tools" / "train_net.py"), "--config-file", cfg, *opts, f"train.output_dir={double}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "World size: 2" in Path(double, "log.txt").read_text()
    ma = torch.load(os.path.join(single, "model_final.pth"), weights_only=False)["model"]
    mb = torch.load(os.path.join(double, "model_final.pth"), weights_only=False)["model"]
    for k in ma:
        torch.testing.assert_close(mb[k], ma[k], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Model EMA (train.model_ema)
# --------------------------------------------------------------------------------------------
def test_model_ema_average_by_hand():
    from tprd.engine.ema import ModelEMA

    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    model[0].bias.requires_grad_(False)  # frozen: not averaged
    ema = ModelEMA(model, decay=0.75)
    assert "0.bias" not in ema.names and {"0.weight", "1.running_mean", "1.weight"} <= set(ema.names)
    assert "1.num_batches_tracked" not in ema.names  # integer buffer
    w0 = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    ema.update()
    with torch.no_grad():
        model[0].weight.fill_(3.0)
    ema.update()
    # 0.75 * (0.75 * w0 + 0.25 * 1) + 0.25 * 3
    expected = 0.75 * (0.75 * w0 + 0.25) + 0.75
    torch.testing.assert_close(ema.average["0.weight"], expected)
    with ema.applied():
        torch.testing.assert_close(model[0].weight.detach(), expected)
    assert torch.all(model[0].weight == 3.0)  # trained weights back after the block
    ema.reset()
    assert torch.all(ema.average["0.weight"] == 3.0)
    with pytest.raises(ValueError, match="decay"):
        ModelEMA(model, decay=1.0)
    with pytest.raises(KeyError, match="EMA state lacks"):
        ema.load_state_dict({"0.weight": expected})


def test_model_ema_in_training_resume_and_eval_only(tmp_path):
    common = ["train.max_iter=8", "train.eval_period=0", "train.checkpointer.period=4",
              "train.model_ema.enabled=True", "train.model_ema.decay=0.5"]
    # the uninterrupted run ("ref") and a run killed at iteration 5 and resumed
    results, ref, got, _ = uninterrupted_and_resumed(tmp_path, common, interrupt_at=6)
    assert "ema/bbox" in results and "bbox" in results
    ref_out = str(tmp_path / "ref")
    cfg = write_config(tmp_path, ref_out)
    final = read_metrics(ref_out)[-1]
    assert "ema/bbox/AP" in final and "bbox/AP" in final
    assert set(ref["ema"]) >= {"class_head.weight", "box_head.0.weight"}
    # with decay 0.5 after 8 steps the average lags behind the trained weights
    assert not torch.equal(ref["ema"]["class_head.weight"], ref["model"]["class_head.weight"])
    # killed and resumed: the same average as the uninterrupted run
    for k in ref["ema"]:
        torch.testing.assert_close(got["ema"][k], ref["ema"][k], rtol=0, atol=1e-6)

    # --eval-only with the EMA weights gives the EMA results of training
    ev = main(make_args(cfg, f"train.output_dir={tmp_path / 'ev'}", *common,
                        f"train.init_checkpoint={ref_out}/model_final.pth",
                        "train.model_ema.use_ema_weights_for_eval_only=True", eval_only=True))
    assert ev["bbox"] == pytest.approx(results["ema/bbox"])
    plain = main(make_args(cfg, f"train.output_dir={tmp_path / 'ev2'}",
                           f"train.init_checkpoint={ref_out}/model_final.pth", eval_only=True))
    assert plain["bbox"] == pytest.approx(results["bbox"])

    # a checkpoint without an average: a clear error
    no_ema = str(tmp_path / "no_ema")
    main(make_args(write_config(tmp_path, no_ema), "train.max_iter=2", "train.eval_period=0"))
    with pytest.raises(KeyError, match="no 'ema' entry"):
        main(make_args(cfg, f"train.output_dir={tmp_path / 'ev3'}", f"train.init_checkpoint={no_ema}/model_final.pth",
                       "train.model_ema.enabled=True", "train.model_ema.use_ema_weights_for_eval_only=True",
                       eval_only=True))
