"""Every distillation method under DDP: two gloo processes against one, on each detector.

For each detector (Deformable DETR, DAB-DETR, DINO, RT-DETRv2) a module-scoped run trains every method
folder ``projects/<detector>/cfg_distill/<Method>[_TPRD]`` (the eight methods, their ``_TPRD`` variants
and ``TPRD``) for two iterations on its synthetic config, once in this process and once on two
processes started by :func:`tprd.engine.launch.launch` (what ``train_net.py --num-gpus 2`` calls; one
process pair trains all the folders of a detector one after the other, which keeps the test time down).
Shrunk for speed: ResNet-18 teacher (RT-DETR: PResNet-18vd teacher, still 6 decoder layers against the
student's 3), 32x40 images (DINO 48x60; RT-DETR pads them to 32x64, a multiple of 32; all of one size,
so no process pads its batch differently), total batch 4, no evaluation, student dropout 0, frozen
batch norm (plain BatchNorm normalises each process's own images; RT-DETR's hybrid encoder and input
projection have no norm option, so the test freezes the student's BatchNorm layers after building it).

RT-DETR trains a representative subset of ten folders (``RT_DETR_FOLDERS``: every ``_TPRD`` folder, and
MGD and KD_DETR): on the shared, loaded two-core machine all 17 folders added 2m50s (115 s of CPU),
the ten 1m20s to 3m depending on the load (60 to 80 s of CPU); the other folders are not
parametrized for it. Each ``_TPRD`` folder computes its method's losses and TPRD's (QSKD_TPRD is QSKD
with refinement), so the subset runs every loss of the plain folders left out and of TPRD alone; MGD
and KD_DETR are kept because their deterministic versions are the only exact check of their scale.

Checked per folder:

* the two-process run finishes (no "Expected to have finished reduction" error);
* every distillation term that is non-zero on one process is non-zero on two;
* the teacher: none of its parameters is synchronised by DDP (they do not require gradients), and
  its weights and buffers after training are bit-identical to those it started with;
* deterministic runs: every loss of both iterations equals the one-process value (MGD with
  ``mask_ratio=0`` and KD-DETR without general points, which checks their scale; their ``_TPRD``
  folders keep their random draws and are checked for the other points only). DINO and RT-DETR
  draw their denoising noise per process (and size the denoising groups by the largest box count
  of the process's own images), so their runs are compared at iteration 0 on the losses that do not
  involve the denoising group (the matching queries are decoded with the denoising queries
  masked off, hence their losses do not depend on the noise). RT-DETR keeps its denoising on rather
  than setting ``num_denoising=0`` for an exact second iteration: the denoising class embedding is
  then trained as in the real configs, and a parameter without a gradient on some process would
  fail the second iteration with "Expected to have finished reduction".
"""
import json
import math
import os
from argparse import Namespace
from pathlib import Path

import pytest

from tprd.data.synthetic import generate_synthetic_dataset
from tprd.engine.launch import launch

REPO = Path(__file__).resolve().parents[1]

CONFIG_NAMES = {
    "deformable_detr": "deformable_detr_r50_distill_r18_synthetic.py",
    "dab_detr": "dab_detr_r50_distill_r18_synthetic.py",
    "dino": "dino_r50_distill_r18_synthetic.py",
    "rt_detr": "rtdetrv2_r50vd_distill_r18vd_synthetic.py",
}
METHODS = ["CrossKD", "D3DETR", "DETRDistill", "FGD", "FitNet", "KD_DETR", "MGD", "QSKD"]
FOLDERS = [m for base in METHODS for m in (base, base + "_TPRD")] + ["TPRD"]
# RT-DETR trains a subset (see the module docstring for the time): every _TPRD folder (the method's
# own losses plus TPRD's, i.e. the union of the losses of the method's plain folder and of TPRD alone;
# QSKD_TPRD is QSKD with refinement), and MGD and KD_DETR, whose deterministic versions are the only
# exact check of their scale (their _TPRD folders draw)
RT_DETR_FOLDERS = [base + "_TPRD" for base in METHODS] + ["KD_DETR", "MGD"]
FOLDERS_OF = {detector: FOLDERS for detector in CONFIG_NAMES} | {"rt_detr": RT_DETR_FOLDERS}
ITERS = 2

COMMON = [
    f"train.max_iter={ITERS}", "train.log_period=1", "train.eval_period=0", "train.checkpointer.period=1000",
    "dataloader.train.total_batch_size=4", "dataloader.train.num_workers=0", "dataloader.evaluator=None",
    # no augmentation (every image of one size, see IMAGE_SIZE; the synthetic images are 128x160)
    "dataloader.train.mapper.augmentation_with_crop=None", "+dataloader.train.mapper.augmentation.0.p=0.0",
    "model.teacher.backbone.depth=18",
]
# the synthetic bases train BatchNorm from scratch; plain (not synchronised) BatchNorm normalises
# each process's own images, which legitimately moves the values: compare with frozen BN, as the
# COCO configs use it (RT-DETR: see FREEZE_STUDENT_BN)
_DETR_FAMILY = [
    "model.student.backbone.norm=FrozenBN", "model.teacher.backbone.norm=FrozenBN",
] + [f"model.student.transformer.{part}.{kind}_dropout=0.0" for part in ("encoder", "decoder") for kind in ("attn", "ffn")]
DETECTOR_OPTS = {
    "deformable_detr": _DETR_FAMILY + ["model.teacher.neck.in_channels=[128,256,512]"],
    "dino": _DETR_FAMILY + ["model.teacher.neck.in_channels=[128,256,512]"],
    "dab_detr": _DETR_FAMILY + ["model.teacher.in_channels=512"],
    # RT-DETRv2 has no dropout in these configs (p=0 everywhere) and no backbone ``norm`` option;
    # its PResNet-18vd teacher feeds 128/256/512 channels to the hybrid encoder
    "rt_detr": ["model.teacher.encoder.in_channels=[128,256,512]"],
}
# short side of the training images: 32x40 (DINO 48x60: its 30 encoder proposals need 30 tokens;
# RT-DETR pads 32x40 to 32x64, a multiple of 32: 32 + 8 + 2 = 42 tokens for its 30 queries)
IMAGE_SIZE = {"deformable_detr": 32, "dab_detr": 32, "dino": 48, "rt_detr": 32}
# RT-DETR's hybrid encoder and decoder input projection use plain BatchNorm2d (no config option):
# the test freezes every BatchNorm of the student right after the model is built (before the
# optimizer and DDP see it), which is what the other detectors' FrozenBN overrides do
FREEZE_STUDENT_BN = {"rt_detr"}
# detectors whose student draws its denoising queries per process (see the module docstring)
DENOISING = {"dino", "rt_detr"}
# deterministic versions of the methods that draw (their _TPRD folders keep the draws)
DETERMINISTIC = {"MGD": ["model.methods.mgd.mask_ratio=0.0"], "KD_DETR": ["model.methods.kd_detr.general_points=0"]}
RANDOM = {"MGD_TPRD", "KD_DETR_TPRD"}


def _checksum(tensors):
    """An order-independent float64 fingerprint of a dict of tensors (sum and sum of squares)."""
    total = [0.0, 0.0]
    for t in tensors.values():
        t = t.detach().double()
        total[0] += float(t.sum())
        total[1] += float((t * t).sum())
    return total


def _teacher_state(state):
    return {k: v for k, v in state.items() if k.startswith("teacher.")}


def train_every_folder(detector, out_root):
    """Train every folder of ``detector`` (in this process, or in each of the launched ones) and
    write ``<out_root>/<folder>/ddp.json``: what DDP synchronises, the teacher's fingerprint before
    and after training. No checkpoint is written (saving is switched off here: it would cost more
    than the two iterations; checkpoints under DDP are tested in tests/test_resume_random.py)."""
    import tprd.engine.main as engine_main
    from tprd.engine import comm
    from tprd.engine.checkpoint import DetectionCheckpointer

    record = {}
    wrap, save, build = engine_main.create_ddp_model, DetectionCheckpointer.save, engine_main.build_model

    def frozen_bn_build_model(cfg):
        from tprd.modeling.presnet import freeze_batch_norm

        model = build(cfg)
        freeze_batch_norm(model.student)
        return model

    def recording_create_ddp_model(model, **kwargs):
        wrapped = wrap(model, **kwargs)
        record["model"] = model
        record["wrapped"] = wrapped is not model
        record["find_unused_parameters"] = bool(getattr(wrapped, "find_unused_parameters", False))
        # DDP all-reduces the gradients of exactly the parameters that require one
        record["synced_teacher_params"] = [n for n, p in model.teacher.named_parameters() if p.requires_grad]
        record["synced_params"] = sum(1 for p in model.parameters() if p.requires_grad)
        record["teacher_before"] = _checksum(_teacher_state(model.state_dict()))
        return wrapped

    engine_main.create_ddp_model = recording_create_ddp_model
    DetectionCheckpointer.save = lambda self, name, **kwargs: None
    if detector in FREEZE_STUDENT_BN:
        engine_main.build_model = frozen_bn_build_model
    try:
        for folder in FOLDERS_OF[detector]:
            out = Path(out_root) / folder
            config = REPO / "projects" / detector / "cfg_distill" / folder / CONFIG_NAMES[detector]
            size = IMAGE_SIZE[detector]
            opts = COMMON + DETECTOR_OPTS[detector] + DETERMINISTIC.get(folder, []) + [
                f"dataloader.train.mapper.augmentation.1.short_edge_length=[{size}]",
                f"dataloader.train.mapper.augmentation.1.max_size={size * 3 // 2}", f"train.output_dir={out}"]
            record.clear()
            engine_main.main(Namespace(config_file=str(config), resume=False, eval_only=False, num_gpus=1,
                                       num_machines=1, machine_rank=0, dist_url="auto", opts=opts))
            comm.synchronize()
            model = record.pop("model")
            if comm.is_main_process():
                record["teacher_after"] = _checksum(_teacher_state(model.state_dict()))
                record["world_size"] = comm.get_world_size()
                (out / "ddp.json").write_text(json.dumps(record))
            del model
            comm.synchronize()
    finally:
        engine_main.create_ddp_model = wrap
        DetectionCheckpointer.save = save
        engine_main.build_model = build


def _metrics(folder):
    with open(folder / "metrics.json") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {r["iteration"]: {k: v for k, v in r.items() if k.startswith(("loss", "distill_"))} for r in rows}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp_datasets")
    generate_synthetic_dataset(root / "synthetic", num_train=8, num_val=2, seed=5)
    return root


def _train_both(detector, datasets, root):
    """``{folder: (one-process metrics, two-process metrics, two-process ddp record, one-process
    ddp record)}`` of every folder of ``detector``."""
    old = os.environ.get("DETECTRON2_DATASETS")
    os.environ["DETECTRON2_DATASETS"] = str(datasets)  # the spawned workers inherit it
    try:
        train_every_folder(detector, root / "one")
        launch(train_every_folder, 2, args=(detector, str(root / "two")))
    finally:
        if old is None:
            os.environ.pop("DETECTRON2_DATASETS", None)
        else:
            os.environ["DETECTRON2_DATASETS"] = old
    results = {}
    for folder in FOLDERS_OF[detector]:
        one, two = root / "one" / folder, root / "two" / folder
        results[folder] = (_metrics(one), _metrics(two), json.loads((two / "ddp.json").read_text()),
                           json.loads((one / "ddp.json").read_text()))
    return results


@pytest.fixture(scope="module")
def run_of(datasets, tmp_path_factory):
    """``run_of(detector)``: the detector's runs (:func:`_train_both`), trained on first use and kept
    for the module, so each detector trains once however many (detector, folder) tests use it."""
    cache = {}

    def get(detector):
        if detector not in cache:
            cache[detector] = _train_both(detector, datasets, tmp_path_factory.mktemp(f"ddp_{detector}"))
        return cache[detector]
    return get


#: every (detector, folder) pair tested, grouped by detector (tests run in this order)
PAIRS = [(d, f) for d in CONFIG_NAMES for f in FOLDERS_OF[d]]


def _compared_keys(detector, iteration, keys):
    if detector not in DENOISING:
        return sorted(keys)
    if iteration > 0:
        return []  # the students differ after the first update (denoising noise drawn per process)
    return sorted(k for k in keys if "_dn" not in k)


@pytest.mark.parametrize("detector, folder", PAIRS)
def test_two_processes_train_every_method_like_one(run_of, detector, folder):
    one, two, ddp, single = run_of(detector)[folder]
    where = f"{detector}/{folder}"
    assert sorted(two) == sorted(one) == list(range(ITERS)), where
    assert ddp["world_size"] == 2 and ddp["wrapped"] and not single["wrapped"], where
    # no method needs DDP's find_unused_parameters: every trainable parameter gets a gradient
    assert ddp["find_unused_parameters"] is False, where
    # the teacher: not synchronised, not updated
    assert ddp["synced_teacher_params"] == [], where
    assert ddp["synced_params"] > 0
    assert ddp["teacher_after"] == ddp["teacher_before"], where
    assert single["teacher_after"] == single["teacher_before"], where
    for it in range(ITERS):
        a, b = one[it], two[it]
        assert set(a) == set(b), (where, it, set(a) ^ set(b))
        for key in (k for k in a if k.startswith("distill_")):
            assert math.isfinite(b[key]), (where, it, key)
            if a[key] != 0.0:
                assert b[key] != 0.0, (where, it, key, "zero on two processes only")
        if folder in RANDOM:
            continue
        for key in _compared_keys(detector, it, a):
            assert b[key] == pytest.approx(a[key], rel=2e-5, abs=1e-6), (where, it, key, a[key], b[key])
    # the methods that draw differ from one process (other draws on rank 1), but not everywhere
    if folder in RANDOM and detector != "dino":
        assert any(one[0][k] != two[0][k] for k in one[0] if k.startswith("distill_")), where
