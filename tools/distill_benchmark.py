#!/usr/bin/env python
"""Fixed-budget distillation benchmark on synthetic data: does the student beat itself trained alone?

    python tools/distill_benchmark.py --out OUT [--detector deformable_detr|dino|dab_detr|rt_detr] \\
        [--methods none,KD_DETR,KD_DETR_TPRD,DETRDistill,DETRDistill_TPRD] [--seeds 1,2,3] \\
        [--budget quick|full] [--dataset coco|voc] [key=value ...]

The protocol, every step through the same ``projects/<detector>/train_net.py`` a user runs
(one subprocess per run, always with ``--resume``, so a killed run continues from its last
checkpoint):

1. the benchmark datasets (``synthetic_bench_*``, :data:`tprd.data.catalog.SYNTHETIC_BENCH_PARAMS`)
   are generated on first use;
2. a **teacher** is trained once per plan (seed 0) and evaluated: the ``model.teacher`` of the
   method configs with the student's ResNet-18 backbone (a ResNet-50 from scratch learned too
   slowly on the CPU: 0.31 AP after the quick budget), made wider (FFN x2), one encoder layer
   deeper, with iterative box refinement and without dropout, trained for four times the
   student's iterations (:func:`model_overrides`). RT-DETRv2 (``--detector rt_detr``): the
   distillation base's ``model.teacher`` (6 decoder layers against the student's 3) with the
   student's PResNet-18vd, one more AIFI layer, FFN x2, no dropout; budgets ``quick`` and ``full``
   only (the ``paper`` regime is built for the Deformable-DETR family);
3. per seed, the distillation init file is built with ``merge_weight.py``'s code
   (:func:`tprd.checkpoint.merge.merge_weights`): the teacher checkpoint plus, standing in for the
   ImageNet backbone, the student backbone that the seed draws (the ``none`` run starts from the
   same draw);
4. the student (``model.student`` of the method configs, ResNet-18) is trained alone (``none``)
   and with each method -- any folder name under ``projects/<detector>/cfg_distill/``, using its
   synthetic config (``<detector>_r50_distill_r18_synthetic.py``; RT-DETRv2:
   ``rtdetrv2_r50vd_distill_r18vd_synthetic.py``, :func:`detector_spec`) -- for the same iterations, batch, data order and
   seed; each run is evaluated during and after training with the COCO evaluator (the VOC one
   for ``--dataset voc``);
5. ``OUT/results.md``, ``OUT/results.json`` and the plots ``OUT/curves.png`` (training losses, AP
   over iterations) and ``OUT/ap_per_method.png`` (AP per method with the seed spread) are written.

A run whose ``benchmark_result.json`` exists is skipped; its command is checked against the plan's,
so a changed plan never silently reuses old results (use another ``--out``). The ``key=value``
overrides go to every run (student, teacher and distillation runs alike), after the budget's.

How the budgets were chosen is written down in ``benchmarks/distill_synthetic.md``.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

#: the detectors with distillation configs: every ``projects/<family>/cfg_distill`` folder (a new
#: detector joins by its configs; the parent process stays free of torch, so no registry import)
DETECTORS = tuple(sorted(p.parent.name for p in (REPO / "projects").glob("*/cfg_distill") if p.is_dir()))
DEFAULT_METHODS = ("none", "KD_DETR", "KD_DETR_TPRD", "DETRDistill", "DETRDistill_TPRD")
METRICS = ("bbox/AP", "bbox/AP50", "bbox/AP75")
RESULT_FILE = "benchmark_result.json"
#: The teacher uses the student's backbone (ResNet-18) instead of the method configs' ResNet-50:
#: see :func:`model_overrides` and benchmarks/distill_synthetic.md ("Choosing the teacher").
TEACHER_BACKBONE_FROM_STUDENT = True
#: environment variable that sets the deformable-attention backend of every model of a run
ENV_BACKEND = "TPRD_MSDA_BACKEND"

#: train / validation dataset names and the data config (its evaluator) per regime and ``--dataset``.
DATASETS = {
    "scratch": {
        "coco": ("synthetic_bench_train", "synthetic_bench_val", "common/data/synthetic_detr.py"),
        "voc": ("synthetic_bench_voc_trainval", "synthetic_bench_voc_test", "common/data/synthetic_voc_detr.py"),
    },
    "paper": {
        "coco": ("synthetic_paper_train", "synthetic_paper_val", "common/data/synthetic_detr.py"),
        "voc": ("synthetic_paper_voc_trainval", "synthetic_paper_voc_test", "common/data/synthetic_voc_detr.py"),
    },
}


@dataclasses.dataclass
class Budget:
    """Iterations and sizes of one plan (every field can be changed on the command line)."""

    student_iter: int
    teacher_iter: int
    batch: int
    num_evals: int  # evaluations per run (AP curve points), the last one after the final iteration
    seeds: str
    lr: float = 4e-4
    #: "scratch": the five-class shapes, backbones from scratch, the synthetic configs' 2 decoder
    #: stages; "paper": the regime of :data:`PAPER` (24 classes, pretrained backbones, 6 stages)
    regime: str = "scratch"


BUDGETS = {
    # see benchmarks/distill_synthetic.md for the measurements behind these numbers
    "quick": Budget(student_iter=150, teacher_iter=600, batch=4, num_evals=2, seeds="1"),
    "full": Budget(student_iter=500, teacher_iter=2000, batch=4, num_evals=4, seeds="1,2,3"),
    "paper": Budget(student_iter=600, teacher_iter=1800, batch=4, num_evals=4, seeds="1,2,3", lr=2e-4,
                    regime="paper"),
}


@dataclasses.dataclass(frozen=True)
class PaperRegime:
    """The ``paper`` budget's setting, closer to the one the TPRD paper reports on (COCO): many
    classes in cluttered scenes (``synthetic_paper_*``: 24 classes, 2-10 objects and grey
    distractors per image), backbones that start pretrained (ResNet-18 classification-pretrained
    once on the same image domain, :mod:`tprd.engine.pretrain`, cached like ImageNet weights),
    frozen batch norm and stem, backbone lr x0.1 as in the COCO configs, and 6 decoder stages, so
    that TPRD can borrow from five earlier stages."""

    num_classes: int = 24
    num_queries: int = 40
    dn_number: int = 10
    decoder_layers: int = 6
    encoder_layers: int = 2
    pretrain_iters: int = 1000


PAPER = PaperRegime()


@dataclasses.dataclass(frozen=True)
class DetectorSpec:
    """What the plan needs to know of a detector's synthetic distillation configs (one row of
    :func:`detector_spec`): the file name under ``cfg_distill/<Method>/`` and ``cfg_distill/base/``,
    the model family (which config keys :func:`model_overrides` sets), the student's backbone name
    (reports), whether the ``paper`` regime is built for it, and per-budget changes of
    :data:`BUDGETS`."""

    config_name: str
    #: "detr": Deformable-DETR family (ResNet ``backbone.depth``/``norm``, ``transformer.*`` keys);
    #: "rt_detr": RT-DETRv2 (PResNet-vd ``backbone``, hybrid ``encoder.*``, ``decoder.*``)
    family: str = "detr"
    student_backbone: str = "R18"
    paper: bool = True
    budgets: Tuple[Tuple[str, Dict[str, Any]], ...] = ()
    #: whether the detector samples with multi-scale deformable attention (what --msda-backend picks)
    deformable: bool = True


#: detectors whose configs do not follow the Deformable-DETR family's naming and keys
_SPECS = {
    # RT-DETRv2 R50vd -> R18vd (6 -> 3 decoder layers). Teacher: see model_overrides and
    # benchmarks/distill_synthetic.md ("Other detectors", RT-DETRv2).
    "rt_detr": DetectorSpec("rtdetrv2_r50vd_distill_r18vd_synthetic.py", family="rt_detr", student_backbone="R18vd",
                            paper=False, deformable=False),
    # DAB-DETR: the family's layout and keys, but plain multi-head attention on one feature level
    "dab_detr": DetectorSpec("dab_detr_r50_distill_r18_synthetic.py", deformable=False),
}


def detector_spec(detector: str) -> DetectorSpec:
    """The row of ``detector``: an entry of ``_SPECS``, else the Deformable-DETR family's layout
    (``<detector>_r50_distill_r18_synthetic.py``, ResNet backbones, ``transformer.*`` keys)."""
    return _SPECS.get(detector) or DetectorSpec(f"{detector}_r50_distill_r18_synthetic.py")


def budget_for(detector: str, name: str) -> Budget:
    """``BUDGETS[name]`` with the detector's changes (a fresh copy); the ``paper`` budget only where
    the detector has the paper regime."""
    spec = detector_spec(detector)
    if BUDGETS[name].regime == "paper" and not spec.paper:
        family = ", ".join(d for d in DETECTORS if detector_spec(d).paper)
        raise ValueError(f"--budget {name}: the paper regime is built for the Deformable-DETR family only ({family}); "
                         f"use --budget quick or full with --detector {detector}")
    return dataclasses.replace(BUDGETS[name], **dict(spec.budgets).get(name, {}))


# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Arm:
    """One arm of the plan: a method (``none`` or a cfg_distill folder) and overrides of its own."""

    name: str
    method: str
    overrides: List[str] = dataclasses.field(default_factory=list)


def parse_arms(methods: str, arm_specs: Optional[Sequence[Sequence[str]]]) -> List[Arm]:
    """``--methods a,b`` (arms named after their method) then each ``--arm NAME=METHOD k=v ...``;
    ``none`` always comes first. Names must be unique and usable as folder names."""
    arms = [Arm(m, m) for m in methods.split(",") if m]
    for spec in arm_specs or []:
        head, *overrides = spec
        name, sep, method = head.partition("=")
        if not sep or not name or not method:
            raise ValueError(f"--arm {' '.join(spec)}: expected NAME=METHOD [key=value ...]")
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ValueError(f"--arm {name}: overrides must be key=value, got {bad}")
        arms.append(Arm(name, method, list(overrides)))
    if not any(a.name == "none" for a in arms):
        arms.insert(0, Arm("none", "none"))
    names = [a.name for a in arms]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"arm names must be unique; repeated: {dup}")
    for a in arms:
        if not all(c.isalnum() or c in "_-." for c in a.name):
            raise ValueError(f"arm name {a.name!r}: use letters, digits, '_', '-' and '.' only")
        if a.name == "none" and (a.method != "none" or a.overrides):
            raise ValueError("the arm 'none' is the student alone; give other arms other names")
    return arms


@dataclasses.dataclass
class Run:
    """One training run of the plan: a config, its overrides and its output folder."""

    name: str  # "teacher" or "<arm>_seed<seed>"
    method: str  # "teacher", "none" or a cfg_distill folder name
    seed: int
    config: Path
    overrides: List[str]
    max_iter: int
    output_dir: Path
    arm: str = ""  # the arm's name ("teacher" for the teacher)

    def command(self, detector: str) -> List[str]:
        entry = REPO / "projects" / detector / "train_net.py"
        return [sys.executable, str(entry), "--config-file", str(self.config), "--resume", *self.overrides]

    @property
    def done(self) -> bool:
        return (self.output_dir / RESULT_FILE).is_file()


def method_config(detector: str, method: str) -> Path:
    """``projects/<detector>/cfg_distill/<method>/<synthetic config>`` (:func:`detector_spec`)."""
    folder = REPO / "projects" / detector / "cfg_distill"
    path = folder / method / detector_spec(detector).config_name
    if not path.is_file():
        known = sorted(p.name for p in folder.iterdir() if (p / path.name).is_file() and p.name != "base")
        raise FileNotFoundError(
            f"--methods: no config {path.relative_to(REPO)} for method {method!r}; methods with a synthetic "
            f"config for {detector}: {', '.join(known)} (and 'none', the student alone)"
        )
    return path


_CONFIG_TEMPLATE = '''"""Generated by tools/distill_benchmark.py: {what}.

The config is {source} with the benchmark's data{member_note}; everything else of the
benchmark setting is on the command line (OUT/commands.sh).
"""
from tprd.config import LazyConfig, get_config

_source = LazyConfig.load({source_path!r})
model = _source.model{member}
optimizer = _source.optimizer
lr_multiplier = _source.lr_multiplier
train = _source.train
dataloader = get_config({data_config!r}).dataloader
'''


def write_config(out: Path, name: str, source: Path, member: Optional[str], data_config: str, what: str) -> Path:
    path = out / "configs" / f"{name}.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = _CONFIG_TEMPLATE.format(
        what=what,
        source=source.relative_to(REPO),
        source_path=str(source),
        member_note=f", and its model.{member} as the model" if member else "",
        member=f".{member}" if member else "",
        data_config=data_config,
    )
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)
    return path


def model_overrides(prefix: str, teacher: bool, student_cfg: Any, regime: str = "scratch",
                    family: str = "detr") -> List[str]:
    """Model changes of the benchmark for the detector family ``family`` (:class:`DetectorSpec`):
    :func:`_detr_model_overrides` or :func:`_rtdetr_model_overrides`."""
    if family == "rt_detr":
        return _rtdetr_model_overrides(prefix, teacher, student_cfg, regime)
    return _detr_model_overrides(prefix, teacher, student_cfg, regime)


def _rtdetr_model_overrides(prefix: str, teacher: bool, student_cfg: Any, regime: str = "scratch") -> List[str]:
    """RT-DETRv2 (scratch regime only): trainable BatchNorm and nothing frozen in the PResNet-vd
    backbones (as the synthetic base already sets; stated here so the command shows it).

    The teacher is the distillation base's ``model.teacher`` -- hybrid encoder with CSP expansion
    1.0 (the student: 0.5) and **6 decoder layers against the student's 3**, the stage pairing this
    detector's distillation exercises (docs/methods.md#stage-pairing) -- with the student's backbone
    (PResNet-18vd instead of 50vd, :data:`TEACHER_BACKBONE_FROM_STUDENT`, so ``encoder.in_channels``
    follow), one more AIFI encoder layer, a twice wider FFN in encoder and decoder, and no dropout.
    RT-DETRv2 always refines boxes layer by layer (no switch). Width, heads, queries and denoising
    queries stay the student's, so query groups and per-stage losses line up."""
    if regime != "scratch":
        raise ValueError(f"regime {regime!r}: RT-DETRv2 has the scratch regime only (budgets quick, full)")
    out = [f"{prefix}backbone.freeze_norm=False", f"{prefix}backbone.freeze_at=-1"]
    if not teacher:
        return out
    ffn = 2 * int(student_cfg.encoder.dim_feedforward)
    out += [
        f"{prefix}encoder.num_encoder_layers={int(student_cfg.encoder.num_encoder_layers) + 1}",
        f"{prefix}encoder.dim_feedforward={ffn}",
        f"{prefix}decoder.dim_feedforward={2 * int(student_cfg.decoder.dim_feedforward)}",
        f"{prefix}encoder.dropout=0.0",
        f"{prefix}decoder.dropout=0.0",
    ]
    if TEACHER_BACKBONE_FROM_STUDENT:
        out += [f"{prefix}backbone.depth={int(student_cfg.backbone.depth)}",
                f"{prefix}encoder.in_channels={_as_override(student_cfg.encoder.in_channels)}"]
    return out


def _detr_model_overrides(prefix: str, teacher: bool, student_cfg: Any, regime: str = "scratch") -> List[str]:
    """Model changes of the benchmark, Deformable-DETR family. ``scratch``: backbones trained from scratch (trainable
    BatchNorm). ``paper``: :data:`PAPER`'s classes, queries and stages; pretrained backbones keep
    the configs' frozen batch norm and stem.

    The teacher (same width, queries and decoder stages as the student, so every method's query
    groups and per-stage losses line up) is made a larger model that learns fast from scratch:
    the student's ResNet-18 backbone (:data:`TEACHER_BACKBONE_FROM_STUDENT`), one encoder layer
    deeper, a twice wider FFN, iterative box refinement where the detector has the switch
    (Deformable DETR; DINO and DAB-DETR always refine) and no dropout. Measured in
    benchmarks/distill_synthetic.md ("Choosing the teacher")."""
    if regime == "paper":
        # pretrained backbones: frozen BN and stem, as on COCO (the synthetic bases train BN from scratch)
        out = [f"{prefix}backbone.norm=FrozenBN", f"{prefix}backbone.freeze_at=1",
               f"{prefix}num_classes={PAPER.num_classes}",
               f"{prefix}transformer.encoder.num_layers={PAPER.encoder_layers}",
               f"{prefix}transformer.decoder.num_layers={PAPER.decoder_layers}"]
        for key, value in (("num_queries", PAPER.num_queries), ("select_box_nums_for_evaluation", PAPER.num_queries),
                           ("dn_number", PAPER.dn_number)):
            if _select(student_cfg, key) is not None:
                out.append(f"{prefix}{key}={value}")
    else:
        out = [f"{prefix}backbone.norm=BN", f"{prefix}backbone.freeze_at=0"]
    if not teacher:
        return out
    enc = (PAPER.encoder_layers if regime == "paper" else int(student_cfg.transformer.encoder.num_layers)) + 1
    ffn = 2 * int(student_cfg.transformer.encoder.feedforward_dim)
    out += [
        f"{prefix}transformer.encoder.num_layers={enc}",
        f"{prefix}transformer.encoder.feedforward_dim={ffn}",
        f"{prefix}transformer.decoder.feedforward_dim={ffn}",
    ]
    if TEACHER_BACKBONE_FROM_STUDENT:
        out.append(f"{prefix}backbone.depth={int(student_cfg.backbone.depth)}")
        for key in ("neck.in_channels", "in_channels"):  # DAB-DETR reads res5 without a neck
            value = _select(student_cfg, key)
            if value is not None:
                out.append(f"{prefix}{key}={_as_override(value)}")
    if _select(student_cfg, "with_box_refine") is not None:
        out.append(f"{prefix}with_box_refine=True")
    for part in ("encoder", "decoder"):
        for key in ("attn_dropout", "ffn_dropout"):
            if _select(student_cfg, f"transformer.{part}.{key}") is not None:
                out.append(f"{prefix}transformer.{part}.{key}=0.0")
    return out


def _regime_line(budget: Budget) -> str:
    if budget.regime != "paper":
        return ""
    return (f"Regime paper: {PAPER.num_classes} classes, {PAPER.num_queries} queries, {PAPER.decoder_layers} decoder "
            f"stages, student encoder {PAPER.encoder_layers} layers, both backbones from the cached "
            f"classification-pretrained ResNet-18 ({PAPER.pretrain_iters} iterations). ")


def _teacher_name(detector: str = "deformable_detr") -> str:
    spec = detector_spec(detector)
    if spec.family == "rt_detr":
        backbone = spec.student_backbone if TEACHER_BACKBONE_FROM_STUDENT else "R50vd"
        return f"{backbone} (6 decoder layers vs 3, CSP expansion 1.0, +1 AIFI layer, FFN x2, no dropout)"
    backbone = spec.student_backbone if TEACHER_BACKBONE_FROM_STUDENT else "R50"
    return f"{backbone} (+1 encoder layer, FFN x2, box refinement, no dropout)"


def _select(cfg: Any, key: str) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.select(cfg, key, default=None)


def _as_override(value: Any) -> str:
    from omegaconf import OmegaConf

    if OmegaConf.is_list(value):
        return "[" + ",".join(str(v) for v in value) + "]"
    return str(value)


def schedule_overrides(budget: Budget, max_iter: int, train_set: str, val_set: str,
                       family: str = "detr") -> List[str]:
    """The same training loop for every run: iterations, batch, lr (scratch: one lr for every
    parameter, nothing is pretrained -- RT-DETRv2's R18vd optimizer, ``AdamW_r18``, has one already;
    paper: the configs' backbone x0.1), lr x0.1 for the last 20%, 5% warmup, evaluations, checkpoints."""
    eval_period = max(1, max_iter // max(1, budget.num_evals))
    return [
        f"train.max_iter={max_iter}",
        f"train.eval_period={eval_period if budget.num_evals > 1 else 0}",
        f"train.checkpointer.period={max(1, min(eval_period, 100))}",
        "train.checkpointer.max_to_keep=2",
        "train.log_period=10",
        "train.device=cpu",
        f"dataloader.train.total_batch_size={budget.batch}",
        f"dataloader.train.dataset.names={train_set}",
        f"dataloader.test.dataset.names={val_set}",
        f"optimizer.lr={budget.lr}",
        *(["optimizer.params.lr_factor_func=None"] if budget.regime == "scratch" and family == "detr" else []),
        f"lr_multiplier.scheduler.milestones=[{max(1, int(max_iter * 0.8))},{max_iter}]",
        "lr_multiplier.warmup_length=0.05",
        "lr_multiplier.warmup_factor=0.1",
    ]


def build_plan(args: argparse.Namespace, budget: Budget) -> Dict[str, Any]:
    """Write the generated configs and return the teacher run, the per-seed init files and the runs."""
    from tprd.engine.main import load_config

    out = args.out
    detector = args.detector
    regime = budget.regime
    train_set, val_set, data_config = DATASETS[regime][args.dataset]
    arms = parse_arms(args.methods, args.arm)
    sources = {a.method: method_config(detector, a.method) for a in arms if a.method != "none"}
    base = REPO / "projects" / detector / "cfg_distill" / "base" / detector_spec(detector).config_name
    seeds = [int(s) for s in (args.seeds or budget.seeds).split(",") if s.strip()]
    user = list(args.overrides)

    spec = detector_spec(detector)
    if regime == "paper" and not spec.paper:
        raise ValueError(f"the paper regime is not built for {detector} (--budget quick or full)")
    family = spec.family
    student_arch = load_config(str(base)).model.student
    teacher_cfg = write_config(out, "teacher", base, "teacher", data_config, "the teacher trained alone")
    student_cfg = write_config(out, "none", base, "student", data_config, "the student trained alone")
    # paper regime: both backbones start from the cached classification-pretrained ResNet-18
    backbone = paper_backbone(train_set, val_set) if regime == "paper" else None
    backbone_init = [f"train.init_checkpoint={backbone}"] if backbone is not None else []
    teacher = Run(
        "teacher", "teacher", 0, teacher_cfg,
        model_overrides("model.", True, student_arch, regime, family)
        + schedule_overrides(budget, budget.teacher_iter, train_set, val_set, family)
        + ["train.seed=0", f"train.output_dir={out / 'teacher'}"] + backbone_init + user,
        budget.teacher_iter, out / "teacher", arm="teacher",
    )
    student_model = model_overrides("model.", False, student_arch, regime, family)
    distill_model = model_overrides("model.student.", False, student_arch, regime, family) + model_overrides(
        "model.teacher.", True, student_arch, regime, family
    )
    runs: List[Run] = []
    inits = {seed: out / "init" / f"teacher_student_seed{seed}.pth" for seed in seeds}
    for seed in seeds:
        for arm in arms:
            name = f"{arm.name}_seed{seed}"
            run_dir = out / "runs" / name
            common = schedule_overrides(budget, budget.student_iter, train_set, val_set, family) + [
                f"train.seed={seed}", f"train.output_dir={run_dir}"
            ]
            if arm.method == "none":
                ov = student_model + common + backbone_init + user
                runs.append(Run(name, "none", seed, student_cfg, ov, budget.student_iter, run_dir, arm=arm.name))
            else:
                cfg = write_config(out, arm.method, sources[arm.method], None, data_config, f"{arm.method} distillation")
                ov = distill_model + common + [f"train.init_checkpoint={inits[seed]}"] + user + arm.overrides
                runs.append(Run(name, arm.method, seed, cfg, ov, budget.student_iter, run_dir, arm=arm.name))
    return {"teacher": teacher, "runs": runs, "inits": inits, "student_cfg": student_cfg,
            "student_overrides": student_model, "seeds": seeds, "arms": arms, "backbone": backbone,
            "datasets": (_last_value(user, "dataloader.train.dataset.names", train_set),
                         _last_value(user, "dataloader.test.dataset.names", val_set))}


def paper_backbone(train_set: str, val_set: str) -> Path:
    """The cached pretrained ResNet-18 of the paper regime (trained on first use, about
    ``PAPER.pretrain_iters`` iterations; see :mod:`tprd.engine.pretrain`)."""
    from tprd.engine.pretrain import PretrainSettings, pretrained_backbone

    return pretrained_backbone(PretrainSettings(dataset=train_set, depth=18, iters=PAPER.pretrain_iters), val_set)


def _last_value(overrides: Sequence[str], key: str, default: str) -> str:
    """The value the last ``key=...`` of ``overrides`` sets (quotes removed), else ``default``."""
    values = [o.split("=", 1)[1].strip("'\"") for o in overrides if o.split("=", 1)[0] == key]
    return values[-1] if values else default


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------
def read_metrics(path: Path) -> List[Dict[str, Any]]:
    """``metrics.json`` records (one JSON object per line); a resumed run writes some iterations
    twice -- the later record of an iteration wins. A torn last line (killed run) is ignored."""
    by_iter: Dict[int, Dict[str, Any]] = {}
    if not path.is_file():
        return []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "iteration" in rec:
            it = int(rec["iteration"])
            # a resumed run restarts at an earlier iteration: drop what the killed run logged after it
            by_iter = {k: v for k, v in by_iter.items() if k < it} | {it: {**by_iter.get(it, {}), **rec}}
    return [by_iter[k] for k in sorted(by_iter)]


def summarise(run: Run) -> Dict[str, Any]:
    """Final AP / AP50 / AP75 and seconds per iteration of a finished run, from its metrics.json."""
    records = read_metrics(run.output_dir / "metrics.json")
    evals = [r for r in records if "bbox/AP" in r]
    if not evals or int(evals[-1]["iteration"]) < run.max_iter - 1:
        raise RuntimeError(
            f"{run.output_dir / 'metrics.json'}: no final evaluation of run {run.name!r}; see "
            f"{run.output_dir / 'benchmark_stdout.log'}"
        )
    final = evals[-1]
    times = [float(r["time"]) for r in records if "time" in r]
    out = {k: float(final[k]) for k in METRICS}
    out["sec_per_iter"] = statistics.median(times) if times else float("nan")
    return out


#: set while a plan stops: :func:`execute` then ends its training subprocess (see :func:`run_side_by_side`)
STOP = threading.Event()


def execute(run: Run, detector: str, env: Dict[str, str], bar,
            extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Run one training (or resume it) in a subprocess, advancing ``bar`` from its metrics.json;
    ``extra`` entries are added to the result (the machine; a distillation run: its teacher's AP)."""
    run.output_dir.mkdir(parents=True, exist_ok=True)
    log = run.output_dir / "benchmark_stdout.log"
    cmd = run.command(detector)
    with open(log, "a") as f:
        f.write(f"\n$ {shlex.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        try:
            shown = 0
            while proc.poll() is None:
                if STOP.wait(1.0):  # the plan is stopping (a signal, or another run failed)
                    break
                records = read_metrics(run.output_dir / "metrics.json")
                it = int(records[-1]["iteration"]) + 1 if records else 0
                if it > shown:
                    bar.update(it - shown)
                    shown = it
            bar.update(run.max_iter - shown)
        finally:
            if proc.poll() is None:  # the benchmark itself is being stopped: stop the run too
                proc.terminate()
                proc.wait()
    if STOP.is_set() and proc.returncode != 0:
        raise RuntimeError(f"run {run.name!r} stopped with the plan; it resumes from its last checkpoint next time")
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-20:])
        raise RuntimeError(f"run {run.name!r} failed (exit {proc.returncode}); log {log}:\n{tail}")
    result = {"method": run.method, "arm": run.arm or run.method, "seed": run.seed, **summarise(run),
              **(extra or {}), "output_dir": str(run.output_dir), "command": cmd[1:]}
    _write_json(run.output_dir / RESULT_FILE, result)
    return result


def load_result(run: Run, detector: str) -> Dict[str, Any]:
    """The stored result of a finished run; an error when it was made with another command."""
    result = json.loads((run.output_dir / RESULT_FILE).read_text())
    result.setdefault("arm", run.arm or run.method)  # results written before arms existed
    if result.get("command") != run.command(detector)[1:]:
        raise RuntimeError(
            f"{run.output_dir / RESULT_FILE} was written by a different plan (another command line); "
            f"use a new --out folder, or delete {run.output_dir} to rerun it"
        )
    return result


def build_init(init: Path, teacher_dir: Path, student_cfg: Path, student_overrides: List[str], seed: int,
               backbone: Optional[Path] = None) -> None:
    """The distillation init file of one seed, with merge_weight.py's code: the trained teacher,
    and the student backbone -- the pretrained file ``backbone`` where given (paper regime), else
    the backbone that ``train.seed=seed`` draws for the student (the ``none`` run's start)."""
    if init.is_file():
        return
    if backbone is not None:
        from tprd.checkpoint.merge import load_state_dict_file, merge_weights, save_atomic

        merged, report = merge_weights(load_state_dict_file(backbone), load_state_dict_file(teacher_dir / "model_final.pth"))
        save_atomic(merged, init)
        (init.with_suffix(".txt")).write_text(report.summary() + "\n")
        return
    from tprd.checkpoint.merge import load_state_dict_file, merge_weights, save_atomic
    from tprd.config import instantiate
    from tprd.engine.defaults import seed_all_rng
    from tprd.engine.main import load_config

    cfg = load_config(str(student_cfg), student_overrides)
    seed_all_rng(seed)  # as the engine does before building the model
    student = instantiate(cfg.model)
    backbone = {f"student.backbone.{k}": v for k, v in student.backbone.state_dict().items()}
    merged, report = merge_weights(backbone, load_state_dict_file(teacher_dir / "model_final.pth"))
    save_atomic(merged, init)
    (init.with_suffix(".txt")).write_text(report.summary() + "\n")


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
def _mean_std(values: Sequence[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def _arm_of(run: Dict[str, Any]) -> str:
    return run.get("arm") or run["method"]


def paired_comparisons(arms: Sequence[Any]) -> List[Tuple[str, str]]:
    """The ``(arm, reference arm)`` pairs the paired table reports: every arm against ``none``;
    ``X_TPRD...`` against ``X...`` (the name without ``_TPRD``) when that arm exists; and an arm
    whose name differs from its method's (an ablation arm) against the arm named after its method."""
    names = [a.name for a in arms]
    pairs: List[Tuple[str, str]] = []
    for a in arms:
        if a.name == "none":
            continue
        pairs.append((a.name, "none"))
        plain = a.name.replace("_TPRD", "", 1)
        if plain != a.name and plain in names:
            pairs.append((a.name, plain))
        if a.method != a.name and a.method in names and (a.name, a.method) not in pairs:
            pairs.append((a.name, a.method))
    return pairs


def paired_stats(runs: List[Dict[str, Any]], arm: str, ref: str, metric: str = "bbox/AP") -> Optional[Dict[str, Any]]:
    """Per-seed differences ``arm − ref`` over the seeds both have (same seed = same data order and
    initial student): mean, sample std, wins (strictly higher), ties and the per-seed values."""
    a = {r["seed"]: r[metric] for r in runs if _arm_of(r) == arm}
    b = {r["seed"]: r[metric] for r in runs if _arm_of(r) == ref}
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    diffs = [a[k] - b[k] for k in seeds]
    return {"seeds": seeds, "diffs": diffs, "mean": statistics.mean(diffs),
            "std": statistics.stdev(diffs) if len(diffs) > 1 else float("nan"),
            "wins": sum(d > 0 for d in diffs), "ties": sum(d == 0 for d in diffs)}


def write_results_md(path: Path, teacher: Dict[str, Any], runs: List[Dict[str, Any]], arms: Sequence[Any],
                     header: List[str]) -> None:
    by_arm = {a.name: [r for r in runs if _arm_of(r) == a.name] for a in arms}
    base = statistics.mean(r["bbox/AP"] for r in by_arm["none"]) if by_arm.get("none") else None
    lines = header + [
        "",
        (f"Teacher (trained alone, seed 0): AP {teacher['bbox/AP']:.2f}, AP50 {teacher['bbox/AP50']:.2f}, "
         f"AP75 {teacher['bbox/AP75']:.2f} ({teacher['sec_per_iter']:.3f} s/iter)") if teacher
        else "Teacher: not part of this call (no distillation arm).",
        "",
        "| arm | method | AP | AP50 | AP75 | AP per seed | gain over none (AP) | s/iter |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for a in arms:
        rs = sorted(by_arm[a.name], key=lambda r: r["seed"])
        if not rs:
            continue
        ap = [r["bbox/AP"] for r in rs]
        gain = "—" if a.name == "none" or base is None else f"{statistics.mean(ap) - base:+.2f}"
        per_seed = ", ".join(f"{r['bbox/AP']:.2f} (s{r['seed']})" for r in rs)
        spi = statistics.median(r["sec_per_iter"] for r in rs)
        lines.append(
            f"| {a.name} | {a.method} | {_mean_std(ap)} | {_mean_std([r['bbox/AP50'] for r in rs])} | "
            f"{_mean_std([r['bbox/AP75'] for r in rs])} | {per_seed} | {gain} | {spi:.3f} |"
        )
    lines += ["", "Mean ± sample standard deviation over seeds; s/iter is the median logged training step time "
              "(wall clock: it moves with the load of a shared machine)."]
    overridden = [a for a in arms if a.overrides]
    if overridden:
        lines += ["", "Arm overrides (on top of the method's config and the plan's settings):", ""]
        lines += [f"- `{a.name}`: `{' '.join(a.overrides)}`" for a in overridden]
    rows = []
    for arm, ref in paired_comparisons(arms):
        st = paired_stats(runs, arm, ref)
        if st is None:
            continue
        spread = "" if math.isnan(st["std"]) else f" ± {st['std']:.2f}"
        per_seed = ", ".join(f"{d:+.2f} (s{k})" for k, d in zip(st["seeds"], st["diffs"]))
        ties = f", {st['ties']} tied" if st["ties"] else ""
        rows.append(f"| {arm} − {ref} | {st['mean']:+.2f}{spread} | {st['wins']} of {len(st['seeds'])}{ties} | {per_seed} |")
    if rows:
        lines += ["", "Paired differences in AP, per seed (same seed = same data order and initial student):", "",
                  "| comparison | mean difference ± std | wins | per seed |", "|---|---|---|---|", *rows]
    path.write_text("\n".join(lines) + "\n")


def _loss_of(rec: Dict[str, Any]) -> Optional[float]:
    """The student's own detection loss: the sum of the ``loss_*`` terms (distillation terms are
    logged as ``distill_*``), comparable between ``none`` and the methods."""
    terms = [v for k, v in rec.items() if k.startswith("loss_")]
    return float(sum(terms)) if terms else None


def write_plots(out: Path, plan_runs: List[Run], results: List[Dict[str, Any]],
                teacher: Dict[str, Any], arm_names: List[str]) -> List[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cmap = plt.cm.tab20 if len(arm_names) > 10 else plt.cm.tab10
    colors = {m: cmap(i % cmap.N) for i, m in enumerate(arm_names)}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for run in plan_runs:
        recs = read_metrics(run.output_dir / "metrics.json")
        its = [r["iteration"] + 1 for r in recs if "total_loss" in r]
        axes[0].plot(its, [r["total_loss"] for r in recs if "total_loss" in r], color=colors[run.arm or run.method],
                     alpha=0.8, lw=1, label=run.name)
        det = [(r["iteration"] + 1, _loss_of(r)) for r in recs if _loss_of(r) is not None]
        axes[1].plot([d[0] for d in det], [d[1] for d in det], color=colors[run.arm or run.method], alpha=0.8, lw=1)
        ev = [(r["iteration"] + 1, r["bbox/AP"]) for r in recs if "bbox/AP" in r]
        axes[2].plot([e[0] for e in ev], [e[1] for e in ev], "o-", color=colors[run.arm or run.method], ms=3)
    if teacher:
        axes[2].axhline(teacher["bbox/AP"], color="k", ls="--", lw=1, label="teacher")
    axes[0].set(title="total training loss (incl. distillation terms)", xlabel="iteration", yscale="log")
    axes[1].set(title="student detection loss (sum of loss_*)", xlabel="iteration", yscale="log")
    axes[2].set(title="validation AP", xlabel="iteration", ylabel="bbox AP")
    axes[0].legend(fontsize=6)
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    curves = out / "curves.png"
    fig.savefig(curves, dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(1.4 * len(arm_names) + 2, 4))
    for i, m in enumerate(arm_names):
        aps = [r["bbox/AP"] for r in results if _arm_of(r) == m]
        if not aps:
            continue
        ax.scatter([i] * len(aps), aps, color=colors[m], s=18, zorder=3)
        std = statistics.stdev(aps) if len(aps) > 1 else 0.0
        ax.errorbar([i], [statistics.mean(aps)], yerr=[std], fmt="_", color="k", ms=20, capsize=6, zorder=4)
    if teacher:
        ax.axhline(teacher["bbox/AP"], color="k", ls="--", lw=1, label=f"teacher {teacher['bbox/AP']:.1f}")
    ax.set_xticks(range(len(arm_names)), arm_names, rotation=20, fontsize=8)
    ax.set(ylabel="bbox AP", title="AP per arm (dots: seeds; bar: mean ± std)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    per_method = out / "ap_per_method.png"
    fig.savefig(per_method, dpi=100)
    plt.close(fig)
    return [curves, per_method]


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output folder of the plan (runs, results, plots)")
    p.add_argument("--detector", choices=DETECTORS, default="deformable_detr",
                   help="a projects/<detector>/cfg_distill family; rt_detr (RT-DETRv2 R50vd -> R18vd configs, "
                        "teacher 6 decoder layers vs the student's 3) has the quick and full budgets only")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help="comma-separated: 'none' (student alone) and cfg_distill folder names; each is an arm "
                        "named after its method ('' for none but the --arm ones)")
    p.add_argument("--arm", action="append", nargs="+", metavar="NAME=METHOD [key=value",
                   help="an arm of the plan: a method with overrides for its runs only, e.g. --arm "
                        "DD_ckd0=DETRDistill model.methods.detrdistill.weights.class=0.0 (repeatable; put the "
                        "plan-wide key=value overrides before the first --arm)")
    p.add_argument("--seeds", default=None, help="comma-separated train.seed values (default: the budget's)")
    p.add_argument("--budget", choices=sorted(BUDGETS), default="quick")
    p.add_argument("--dataset", choices=sorted(DATASETS["scratch"]), default="coco",
                   help="coco: synthetic_bench_train/val, COCO evaluator; voc: the VOC layout, VOC evaluator")
    for field in dataclasses.fields(Budget):
        if field.name != "seeds":
            kind = float if field.name == "lr" else int
            p.add_argument(f"--{field.name.replace('_', '-')}", type=kind, default=None,
                           help=f"override the budget's {field.name}")
    p.add_argument("--msda-backend", default=None,
                   help="deformable-attention backend of every model of every run (sets "
                        "$TPRD_MSDA_BACKEND for the runs), e.g. 'cpp' for the C++ CPU kernel; "
                        "default: the process default ('auto': the C++ kernel on CPU when it builds, else the "
                        "pure-PyTorch Function)")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs trained side by side after the teacher (each a process; use OMP_NUM_THREADS=1 "
                        "and at most the number of cores); a failed run or a stop (Ctrl-C, kill) ends them all, "
                        "and each resumes from its last checkpoint on the next call")
    p.add_argument("--store", type=Path, default=None,
                   help="keep every finished run's result and metrics here (e.g. in the repository) and take "
                        "runs found here as done, so that a plan continues on another machine; "
                        "STORE.json merges every stored run")
    p.add_argument("overrides", nargs="*", help="key=value config overrides for every run")
    args = p.parse_args(argv)
    args.out = args.out.resolve()
    if args.store is not None:
        args.store = args.store.resolve()
    try:
        parse_arms(args.methods, args.arm)
        budget_for(args.detector, args.budget)
    except ValueError as exc:
        p.error(str(exc))
    if args.msda_backend:
        from tprd.layers.ms_deform_attn import check_msda_backend

        try:
            check_msda_backend(args.msda_backend)
        except ValueError as exc:
            p.error(f"--msda-backend: {exc}")
    return args


class Store:
    """Finished runs kept in the repository (``--store DIR``), so that a plan continues on a fresh
    machine: per run its ``benchmark_result.json`` (command with ``$OUT``/``$REPO``/``$BACKBONE``
    in place of this machine's paths) and ``metrics.json``, under the run's folder relative to
    ``--out`` (``teacher``, ``runs/<arm>_seed<seed>``). No weights are stored: a plan that still has
    distillation runs to do retrains the teacher (deterministic on one machine and torch build) and
    stops if its AP differs from the stored teacher's."""

    def __init__(self, root: Optional[Path], out: Path, backbone: Optional[Path]):
        self.root, self.out, self.backbone = root, out, backbone

    def _normal(self, command: Sequence[str]) -> List[str]:
        subs = [(str(self.out), "$OUT"), (str(REPO), "$REPO")]
        if self.backbone is not None:
            subs.insert(0, (str(self.backbone), "$BACKBONE"))
        out = []
        for c in command:
            for a, b in subs:
                c = c.replace(a, b)
            out.append(c)
        return out

    def _dir(self, run: Run) -> Path:
        assert self.root is not None
        return self.root / run.output_dir.relative_to(self.out)

    def get(self, run: Run, detector: str) -> Optional[Dict[str, Any]]:
        """The stored result of ``run`` (with this machine's paths), if stored with the same command."""
        if self.root is None or not (self._dir(run) / RESULT_FILE).is_file():
            return None
        stored = json.loads((self._dir(run) / RESULT_FILE).read_text())
        if stored.get("command") != self._normal(run.command(detector)[1:]):
            raise RuntimeError(
                f"{self._dir(run) / RESULT_FILE} was stored by a different plan (another command line); use "
                f"another --store folder, or delete {self._dir(run)} to rerun it"
            )
        return {**stored, "command": run.command(detector)[1:], "output_dir": str(run.output_dir)}

    def restore(self, run: Run, detector: str) -> bool:
        """Copy a stored result (and its metrics) into the run's folder; False when none is stored."""
        result = self.get(run, detector)
        if result is None:
            return False
        run.output_dir.mkdir(parents=True, exist_ok=True)
        metrics = self._dir(run) / "metrics.json"
        if metrics.is_file() and not (run.output_dir / "metrics.json").is_file():
            (run.output_dir / "metrics.json").write_text(metrics.read_text())
        _write_json(run.output_dir / RESULT_FILE, result)
        return True

    def put(self, run: Run, result: Dict[str, Any]) -> None:
        if self.root is None:
            return
        folder = self._dir(run)
        folder.mkdir(parents=True, exist_ok=True)
        stored = {**result, "command": self._normal(result["command"]),
                  "output_dir": "$OUT/" + str(run.output_dir.relative_to(self.out))}
        _write_json(folder / RESULT_FILE, stored)
        if (run.output_dir / "metrics.json").is_file():
            tmp = folder / "metrics.json.tmp"
            tmp.write_text((run.output_dir / "metrics.json").read_text())
            os.replace(tmp, folder / "metrics.json")

    def all_results(self) -> Tuple[Optional[Dict[str, Any]], List[Dict[str, Any]]]:
        """The stored teacher and every stored run (all arms ever run into this store)."""
        if self.root is None:
            return None, []
        teacher_file = self.root / "teacher" / RESULT_FILE
        teacher = json.loads(teacher_file.read_text()) if teacher_file.is_file() else None
        runs = [json.loads(f.read_text()) for f in sorted((self.root / "runs").glob(f"*/{RESULT_FILE}"))]
        return teacher, runs


def unrestore(run: Run) -> None:
    """Undo :meth:`Store.restore` in the run's folder: its copied result (and its copied metrics,
    when the folder holds nothing else)."""
    (run.output_dir / RESULT_FILE).unlink(missing_ok=True)
    left = {p.name for p in run.output_dir.iterdir()} if run.output_dir.is_dir() else set()
    if run.output_dir.is_dir() and left <= {"metrics.json"}:
        (run.output_dir / "metrics.json").unlink(missing_ok=True)
        run.output_dir.rmdir()


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    # a plain `kill` stops the current run too (the finally of execute); a run resumes next time
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    budget = budget_for(args.detector, args.budget)
    for field in dataclasses.fields(Budget):
        value = getattr(args, field.name, None)
        if value is not None and field.name != "seeds":
            setattr(budget, field.name, value)
    from tqdm import tqdm

    from tprd.data.catalog import prepare_dataset

    args.out.mkdir(parents=True, exist_ok=True)
    plan = build_plan(args, budget)
    teacher_run: Run = plan["teacher"]
    runs: List[Run] = plan["runs"]
    detector = args.detector
    store = Store(args.store, args.out, plan["backbone"])

    # (a) the data, generated once (the runs then find it)
    for name in plan["datasets"]:
        prepare_dataset(name)

    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if args.msda_backend:
        env[ENV_BACKEND] = args.msda_backend
    with open(args.out / "commands.sh", "w") as f:
        f.write("# the runs of this plan, in order (each is resumable: --resume)\n")
        if env.get(ENV_BACKEND):
            f.write(f"export {ENV_BACKEND}={shlex.quote(env[ENV_BACKEND])}\n")
        for run in [teacher_run] + runs:
            f.write(shlex.join(run.command(detector)[1:]) + "\n")

    # (b) runs finished earlier, kept in the repository
    restored = [run for run in runs if not run.done and store.restore(run, detector)]
    todo = [r for r in runs if not r.done]
    total = sum(r.max_iter for r in todo)
    teacher_weights = (teacher_run.output_dir / "model_final.pth").is_file()
    stored_teacher = store.get(teacher_run, detector)
    machine = machine_fingerprint()
    warning = machine_warning(stored_teacher, machine)
    if warning and any(r.method != "none" for r in todo):
        print(warning, file=sys.stderr, flush=True)
    need_teacher = any(r.method != "none" for r in todo) and not (teacher_run.done and teacher_weights)
    if all(r.method == "none" for r in runs) and stored_teacher is None and not teacher_run.done:
        need_teacher = False
    if need_teacher:
        total += teacher_run.max_iter

    def same_teacher(teacher: Dict[str, Any]) -> None:
        """:func:`check_teacher`; on a mismatch the runs copied from the store (the stored teacher's,
        made on another machine) are taken out of this --out again before the error."""
        try:
            check_teacher(teacher, stored_teacher)
        except RuntimeError:
            for run in restored:
                unrestore(run)
            raise

    started = time.time()
    lock = threading.Lock()
    with tqdm(total=total, unit="it", desc="benchmark", dynamic_ncols=True, smoothing=0.05) as bar:
        only_none = all(r.method == "none" for r in runs)
        if teacher_run.done:
            teacher = load_result(teacher_run, detector)
            if stored_teacher is None and not only_none:
                # trained in this --out before the store was given: the store's runs learn from it
                store.put(teacher_run, teacher)
            else:
                same_teacher(teacher)
        elif only_none and stored_teacher is None:  # e.g. `--methods none` beside a plan training the teacher
            teacher = None
        elif need_teacher or stored_teacher is None:
            bar.set_postfix_str(teacher_run.name)
            with run_lock(teacher_run):
                if teacher_run.done:  # finished meanwhile by another call on this --out
                    teacher = load_result(teacher_run, detector)
                else:
                    teacher = execute(teacher_run, detector, env, bar, {"machine": machine})
                    same_teacher(teacher)
                    store.put(teacher_run, teacher)
        else:  # every distillation run is stored: the stored teacher's result is enough
            store.restore(teacher_run, detector)
            teacher = load_result(teacher_run, detector)
        for seed, init in plan["inits"].items():
            if any(r.seed == seed and r.method != "none" for r in todo):
                build_init(init, teacher_run.output_dir, plan["student_cfg"], plan["student_overrides"], seed,
                           plan["backbone"])
        finished: Dict[str, Dict[str, Any]] = {r.name: load_result(r, detector) for r in runs if r.done}
        for run in runs:
            if run.name in finished:
                check_distilled_from(run, finished[run.name], teacher)
        extra = {TEACHER_AP: teacher["bbox/AP"]} if teacher is not None else {}

        def report_so_far() -> Dict[str, Any]:
            ordered = [finished[r.name] for r in runs if r.name in finished]
            rep = write_report(args, budget, plan, teacher, ordered, time.time() - started,
                               complete=len(ordered) == len(runs))
            if store.root is not None:
                write_store_summary(store, args, budget, teacher)
            return rep

        def one(run: Run) -> None:
            with run_lock(run):  # another call on the same --out may be training this run
                if run.done:
                    result = load_result(run, detector)
                    check_distilled_from(run, result, teacher)
                else:
                    result = execute(run, detector, env, bar,
                                     {**(extra if run.method != "none" else {}), "machine": machine})
            with lock:
                store.put(run, result)
                finished[run.name] = result
                # the table so far after every run: a benchmark stopped midway still leaves its results
                report_so_far()

        if args.jobs <= 1 or len(todo) <= 1:
            for run in todo:
                bar.set_postfix_str(run.name)
                one(run)
        else:
            run_side_by_side(todo, one, args.jobs)
        report = report_so_far()
    print((args.out / "results.md").read_text())
    return report


def run_side_by_side(todo: Sequence[Run], one, jobs: int) -> None:
    """``one(run)`` for every run, ``jobs`` at a time. The first failure, or a stop of the benchmark
    (SIGTERM, Ctrl-C), ends the plan at once: queued runs do not start and the runs in flight stop
    (:data:`STOP`); each resumes from its last checkpoint on the next call."""
    from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

    first_failure: List[BaseException] = []  # the cause (the runs it stops fail after it)
    guard = threading.Lock()

    def guarded(run: Run) -> None:
        if STOP.is_set():  # the plan is ending: a queued run does not start
            return
        try:
            one(run)
        except BaseException as exc:
            with guard:
                if not STOP.is_set():
                    first_failure.append(exc)
                STOP.set()  # before this worker takes the next run
            raise

    pool = ThreadPoolExecutor(max_workers=jobs)
    try:
        wait([pool.submit(guarded, run) for run in todo], return_when=FIRST_EXCEPTION)
        if first_failure:
            raise first_failure[0]
    except BaseException:
        STOP.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        STOP.clear()


@contextlib.contextmanager
def run_lock(run: Run, poll: float = 10.0):
    """Exclusive use of a run's folder across calls sharing one ``--out`` (e.g. ``--methods none``
    beside the full plan): a lock file with the owner's pid; a lock whose owner is gone is taken over."""
    run.output_dir.mkdir(parents=True, exist_ok=True)
    lock = run.output_dir / ".benchmark_lock"
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                owner = int(lock.read_text().strip() or 0)
                os.kill(owner, 0)
            except (ValueError, OSError):  # stale: its process is gone
                lock.unlink(missing_ok=True)
                continue
            time.sleep(poll)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        break
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


#: key of a distillation run's result that records the AP of the teacher it learned from
TEACHER_AP = "teacher_bbox/AP"


def machine_fingerprint() -> Dict[str, str]:
    """What makes this machine's numbers its own: torch's version, the CPU instruction set torch
    dispatches to, and a hash of a few fixed float32 computations on one thread (a convolution, a
    matrix product, a softmax), whose last bits differ between CPUs or builds that round otherwise."""
    import hashlib

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(0)
        conv = torch.nn.functional.conv2d(torch.randn(2, 16, 33, 41, generator=g), torch.randn(32, 16, 3, 3, generator=g),
                                          padding=1)
        product = torch.randn(97, 256, generator=g) @ torch.randn(256, 131, generator=g)
        soft = torch.randn(64, 300, generator=g).softmax(-1)
        digest = hashlib.sha256(b"".join(t.contiguous().numpy().tobytes() for t in (conv, product, soft)))
    finally:
        torch.set_num_threads(threads)
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:
        capability = "unknown"
    return {"torch": torch.__version__, "cpu_capability": capability, "numeric": digest.hexdigest()[:16]}


def machine_warning(stored_teacher: Optional[Dict[str, Any]], here: Dict[str, str]) -> Optional[str]:
    """A warning when the store's teacher was trained on a machine whose fingerprint differs from
    this one's (a retrained teacher will most likely differ, and the plan stop after retraining it)."""
    there = (stored_teacher or {}).get("machine")
    if not there or there.get("numeric") == here["numeric"]:
        return None
    return (f"warning: the stored teacher was trained on another machine (torch {there.get('torch')}, "
            f"{there.get('cpu_capability')}, numeric fingerprint {there.get('numeric')}; here torch {here['torch']}, "
            f"{here['cpu_capability']}, {here['numeric']}): the teacher retrained here will most likely differ and "
            "the plan then stops; a new --store runs the whole plan on this machine")


def check_distilled_from(run: Run, result: Dict[str, Any], teacher: Optional[Dict[str, Any]]) -> None:
    """A finished distillation run must have learned from this plan's teacher (results written
    before the teacher's AP was recorded are taken as they are)."""
    if teacher is None or run.method == "none" or TEACHER_AP not in result:
        return
    if abs(float(result[TEACHER_AP]) - float(teacher["bbox/AP"])) > 1e-9:
        raise RuntimeError(
            f"{run.output_dir / RESULT_FILE} was distilled from another teacher (bbox/AP {result[TEACHER_AP]:.4f}, "
            f"this plan's teacher {teacher['bbox/AP']:.4f}): it comes from another machine or store; delete "
            f"{run.output_dir} to train it again here"
        )


def run_entry(result: Dict[str, Any]) -> Dict[str, Any]:
    """A run as ``results.json`` lists it (with its teacher's AP and its machine where recorded)."""
    entry = {k: result.get(k) for k in ("method", "arm", "seed", *METRICS, "sec_per_iter", "output_dir")}
    for key in (TEACHER_AP, "machine"):
        if key in result:
            entry[key] = result[key]
    return entry


def check_teacher(teacher: Dict[str, Any], stored: Optional[Dict[str, Any]]) -> None:
    """A retrained teacher must be the stored one: otherwise new runs would distil from another model."""
    if stored is None:
        return
    diffs = {k: (teacher[k], stored[k]) for k in METRICS if abs(float(teacher[k]) - float(stored[k])) > 1e-9}
    if diffs:
        raise RuntimeError(
            "the teacher trained here differs from the stored one ("
            + ", ".join(f"{k} {a:.4f} vs stored {b:.4f}" for k, (a, b) in diffs.items())
            + "): the numbers depend on the CPU and the torch build, so this machine cannot continue the stored "
              "plan; start a new --store to run the whole plan here (this --out keeps the retrained teacher; the "
              "runs that were copied into it from the store are removed from it again)"
        )


def write_store_summary(store: Store, args, budget: Budget, fallback_teacher: Dict[str, Any]) -> Path:
    """``<store>.json``: the ``results.json`` contract over every run in the store (all arms run into
    it so far, from any invocation), each with its ``arm``."""
    teacher, stored = store.all_results()
    teacher = teacher or fallback_teacher or {}
    backend = args.msda_backend or os.environ.get(ENV_BACKEND) or "auto"
    summary = {
        "detector": args.detector,
        "budget": args.budget,
        "dataset": args.dataset,
        "msda_backend": backend,
        "teacher": {k: v for k, v in teacher.items() if k not in ("command", "method", "seed", "arm")},
        "runs": [run_entry(r) for r in stored],
    }
    path = store.root.with_suffix(".json")
    _write_json(path, summary)
    return path


def _sampling_line(detector: str, backend: str) -> str:
    """The report's line on the attention sampling: the deformable-attention backend, which RT-DETRv2's
    decoder (its own per-level sampling) and DAB-DETR (plain attention) do not use."""
    spec = detector_spec(detector)
    if spec.family == "rt_detr":
        return "Decoder sampling: RT-DETRv2's own (--msda-backend does not apply)."
    if not spec.deformable:
        return "Attention: plain multi-head attention, no deformable sampling (--msda-backend does not apply)."
    return f"Deformable-attention backend: {backend}."


def write_report(args, budget: Budget, plan: Dict[str, Any], teacher: Dict[str, Any],
                 results: List[Dict[str, Any]], wall: float, complete: bool) -> Dict[str, Any]:
    """``results.json``, ``results.md`` and the plots of the runs finished so far."""
    backend = args.msda_backend or os.environ.get(ENV_BACKEND) or "auto"
    report = {
        "msda_backend": backend,
        "teacher": {k: v for k, v in (teacher or {}).items() if k not in ("command", "method", "seed", "arm")},
        "runs": [run_entry(r) for r in results],
    }
    overridden = {a.name: a.overrides for a in plan["arms"] if a.overrides}
    if overridden:
        report["arm_overrides"] = overridden
    _write_json(args.out / "results.json", report)
    state = "" if complete else f" **Partial: {len(results)} of {len(plan['runs'])} runs finished so far.**"
    header = [
        f"# Distillation benchmark: {args.detector}, budget {args.budget}, dataset {args.dataset}",
        "",
        f"{_regime_line(budget)}Student {detector_spec(args.detector).student_backbone} {budget.student_iter} "
        f"iterations, teacher {_teacher_name(args.detector)} {budget.teacher_iter} "
        f"iterations, batch "
        f"{budget.batch}, seeds {', '.join(map(str, plan['seeds']))}; train {plan['datasets'][0]}, "
        f"validation {plan['datasets'][1]}. Commands: commands.sh. This call: {wall / 60:.1f} min "
        f"(finished runs are not rerun). {_sampling_line(args.detector, backend)}{state}",
    ]
    write_results_md(args.out / "results.md", report["teacher"], report["runs"], plan["arms"], header)
    done = {(r["arm"], r["seed"]) for r in results}
    write_plots(args.out, [r for r in plan["runs"] if (r.arm, r.seed) in done], report["runs"],
                report["teacher"], [a.name for a in plan["arms"]])
    return report


if __name__ == "__main__":
    main()
