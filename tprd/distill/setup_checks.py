"""Checks of a distillation set-up, before the first step (each failure a one-line user error).

* :func:`check_distill_config` (engine, before anything is written): a distiller trained without
  ``train.init_checkpoint`` would distil from a random teacher, refused unless
  ``train.allow_random_teacher=True`` (then every run warns); loss weights, TPRD-CKD weights,
  temperatures and matching costs of ``model.methods`` must be finite and non-negative
  (temperatures positive), named by their config path.
* :func:`check_method_values` (``Distiller.__init__``): the same on the built methods.
* :func:`check_teacher_state_dict` (loading the init file): a teacher checkpoint of another
  detector or another class count is named as such.
* :func:`teacher_mode_note`: the line logged once when the teacher follows ``train()``.
"""
from __future__ import annotations

import math
import re
from collections import abc
from typing import TYPE_CHECKING, Any, List, Mapping, Optional

from tprd.config.select import select_value
from tprd.errors import SetupError

if TYPE_CHECKING:
    from tprd.modeling.detector import DETRDetector

__all__ = [
    "is_distiller_config",
    "check_distill_config",
    "check_method_values",
    "check_teacher_state_dict",
    "teacher_mode_note",
    "RANDOM_TEACHER_WARNING",
]

RANDOM_TEACHER_WARNING = (
    "The teacher is RANDOM (no train.init_checkpoint; train.allow_random_teacher=True): this run checks the "
    "pipeline, its distillation signal is meaningless. Train a teacher and merge it with merge_weight.py "
    "(README, CPU walkthrough) to distil for real"
)

#: Method settings that scale a loss or a cost: finite and >= 0. Temperatures: finite and > 0.
_SCALE_KEYS = {"alpha", "beta", "gamma", "lambda_", "soft_costs", "weights"}
_POSITIVE_KEYS = {"temperature", "tau"}


_get = select_value  # one dotted config entry, or a default


def is_distiller_config(cfg: Any) -> bool:
    model = _get(cfg, "model")
    return model is not None and hasattr(model, "keys") and "teacher" in model and "student" in model


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _bad_values(node: Any, path: str, positive: bool, out: List[str]) -> None:
    if isinstance(node, abc.Mapping) or hasattr(node, "items") and hasattr(node, "keys"):
        for k, v in node.items():
            _bad_values(v, f"{path}.{k}", positive, out)
        return
    if isinstance(node, (list, tuple)) or type(node).__name__ == "ListConfig":
        for i, v in enumerate(node):
            _bad_values(v, f"{path}.{i}", positive, out)
        return
    value = _number(node)
    if value is None:
        return
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        out.append(f"{path}={node}")


def _scan_method(node: Any, path: str, out: List[str]) -> None:
    """Scale-like settings of one method (its own keys; nested nodes such as matchers too)."""
    if not (isinstance(node, abc.Mapping) or hasattr(node, "items") and hasattr(node, "keys")):
        return
    for k, v in node.items():
        key = str(k)
        if key == "_target_":
            continue
        sub = f"{path}.{key}"
        if key in _SCALE_KEYS or key.startswith("cost_"):
            _bad_values(v, sub, False, out)
        elif key in _POSITIVE_KEYS:
            _bad_values(v, sub, True, out)
        else:
            _scan_method(v, sub, out)


def _raise_bad(bad: List[str], where: str) -> None:
    if bad:
        raise SetupError(
            f"distillation settings must be finite and non-negative (temperatures positive): {', '.join(bad)} "
            f"in {where}; a negative weight turns a distillation term into a reward for moving away from the teacher"
        )


def check_distill_config(cfg: Any, args: Any) -> List[str]:
    """The set-up checks of a distillation config (nothing for a plain detector config).
    Returns the warnings to log once the run's logging is set up."""
    if not is_distiller_config(cfg):
        return []
    bad: List[str] = []
    methods = _get(cfg, "model.methods")
    if methods is not None and hasattr(methods, "items"):
        for name, node in methods.items():
            _scan_method(node, f"model.methods.{name}", bad)
    elif methods is not None and type(methods).__name__ in ("ListConfig", "list"):
        for i, node in enumerate(methods):
            _scan_method(node, f"model.methods.{i}", bad)
    _raise_bad(bad, "the config or its overrides")
    if methods is not None:
        from tprd.config import instantiate

        instantiate(methods)  # small modules: their own checks (term names ...) before anything is written

    warnings: List[str] = []
    if getattr(args, "eval_only", False):
        return warnings  # only the student is evaluated
    init = str(_get(cfg, "train.init_checkpoint", "") or "")
    if init:
        return warnings
    if getattr(args, "resume", False):
        import os

        output_dir = str(_get(cfg, "train.output_dir", "") or "")
        if output_dir and os.path.isfile(os.path.join(output_dir, "last_checkpoint")):
            return warnings  # the checkpoint holds the teacher
    if not bool(_get(cfg, "train.allow_random_teacher", False)):
        raise SetupError(
            "this distillation config has no teacher weights (train.init_checkpoint is empty), so it would distil "
            "from a randomly initialised teacher. Build an init file with merge_weight.py --input1 <student backbone> "
            "--input2 <teacher checkpoint> --output init.pth and add train.init_checkpoint=init.pth; to check the "
            "pipeline with a random teacher on purpose, add train.allow_random_teacher=True"
        )
    warnings.append(RANDOM_TEACHER_WARNING)
    return warnings


def check_method_values(methods: Any) -> None:
    """Weights, TPRD-CKD weights, costs and temperatures of built methods: finite, non-negative
    (temperatures positive)."""
    bad: List[str] = []
    for m in methods:
        name = getattr(m, "name", type(m).__name__)
        for term, w in dict(getattr(m, "weights", {}) or {}).items():
            _bad_values(w, f"{name}.weights.{term}", False, bad)
        for attr in ("alpha", "beta", "gamma", "lambda_", "soft_costs"):
            if hasattr(m, attr):
                _bad_values(getattr(m, attr), f"{name}.{attr}", False, bad)
        for attr in _POSITIVE_KEYS:
            if hasattr(m, attr):
                _bad_values(getattr(m, attr), f"{name}.{attr}", True, bad)
    _raise_bad(bad, "the distillation methods")


#: a detector's declared ``family`` -> the name :func:`tprd.checkpoint.describe_state_dict` uses
_FAMILIES = {"deformable_detr": "Deformable DETR", "dino": "DINO", "dab_detr": "DAB-DETR", "rt_detr": "RT-DETR"}


def check_teacher_state_dict(teacher: DETRDetector, state_dict: Mapping[str, Any]) -> None:
    """A teacher part of an init file (keys without ``teacher.``) that is another detector, or has
    another class count, than the config's teacher: a :class:`CheckpointMismatchError` saying so."""
    from tprd.checkpoint import CheckpointMismatchError, describe_state_dict
    from tprd.checkpoint.loading import _num_classes

    if not state_dict:
        return
    description = describe_state_dict(state_dict)
    family = _FAMILIES.get(teacher.family)
    found = re.search(r"(Deformable DETR|DINO|DAB-DETR|RT-DETR)", description)
    fix = ("use a checkpoint of the config's teacher as --input2 of merge_weight.py, or set model.teacher to "
           "the detector of that checkpoint")
    if family and found and found.group(1) != family:
        raise CheckpointMismatchError(
            f"the teacher in the init checkpoint looks like {description.replace('a ', '', 1)}, but the config's "
            f"teacher is a {family} ({type(teacher).__name__}): {fix}"
        )
    theirs, ours = _num_classes(state_dict), teacher.num_classes
    if theirs is not None and int(theirs) != int(ours):
        raise CheckpointMismatchError(
            f"the teacher in the init checkpoint has {theirs} classes ({description}), the config's teacher "
            f"{ours} (model.teacher.num_classes): a teacher must be trained on the student's label space; use a "
            f"teacher trained on this dataset (or, if the dataset really has {theirs} classes, set num_classes of "
            "model.teacher and model.student to it)"
        )


def teacher_mode_note(teacher: Any) -> str:
    """What ``teacher_train_mode=True`` does to this teacher (logged once at construction)."""
    import torch.nn as nn

    norms = sum(1 for m in teacher.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats)
    drops = sum(1 for m in teacher.modules() if isinstance(m, nn.Dropout) and m.p > 0)
    parts = [f"its {drops} dropout layers are active" if drops else "it has no active dropout"]
    if norms:
        parts.append(f"the running statistics of its {norms} BatchNorm layers move with every training batch")
    return ("model.teacher_train_mode=True: the teacher follows train()/eval() (the reference's behaviour, not the "
            "default): " + "; ".join(parts))
