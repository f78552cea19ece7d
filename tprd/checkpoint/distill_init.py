"""The init-checkpoint rules of a distiller: split a merged file by part, rename, validate, load.

A distillation init file (``merge_weight.py``: ``student.backbone.<detectron2 names>``,
``teacher.<detrex names>``, ``student.transformer.level_embeds``) or a distiller checkpoint is one
flat state dict whose keys start with the part they belong to. The policy
(:func:`load_distill_init_checkpoint`):

* teacher: every key must load (a teacher that loads partially is an error, never a warning), and it
  must be the config's detector with the config's class count (:func:`check_teacher_state_dict`);
* student backbone: every key must load (the merged file always has it);
* student, other keys: may be missing (freshly initialised parts), reported;
* shape mismatches anywhere: an error naming key and shapes.

Every refusal is a :class:`~tprd.checkpoint.CheckpointMismatchError` (a ``ValueError``). Each part
is renamed by its own detector's detrex adapter (:mod:`tprd.checkpoint.detrex`); the reference
distiller's own modules (``distill_criterion.*``) by the callable the distiller passes in (its
methods know their keys).
"""
from __future__ import annotations

import logging
import os
import re
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

from torch import Tensor, nn

from .detrex import ADAPTERS, adapter_for
from .loading import _num_classes, describe_state_dict
from .state_dict import CheckpointMismatchError

__all__ = [
    "PARTS",
    "split_init_state_dict",
    "check_teacher_state_dict",
    "convert_init_state_dict",
    "missing_keys",
    "check_student_backbone",
    "load_distill_init_checkpoint",
]

logger = logging.getLogger("tprd.checkpoint")

#: the key prefixes of a distiller's state dict (``other``: un-prefixed keys, anything else)
PARTS = ("student", "teacher", "methods", "distill_criterion", "other")

MethodKeyConverter = Callable[[Mapping[str, Tensor]], Dict[str, Tensor]]


def split_init_state_dict(state_dict: Mapping[str, Tensor]) -> Dict[str, Dict[str, Tensor]]:
    """Split a flat state dict by prefix: ``student``, ``teacher``, ``methods``,
    ``distill_criterion`` (the reference distiller's own method modules) and ``other``
    (un-prefixed duplicates written by the reference's merge script, anything else)."""
    parts: Dict[str, Dict[str, Tensor]] = {p: {} for p in PARTS}
    for key, value in state_dict.items():
        head, _, rest = key.partition(".")
        if head in parts and head != "other" and rest:
            parts[head][rest] = value
        else:
            parts["other"][key] = value
    return parts


def check_teacher_state_dict(teacher: nn.Module, state_dict: Mapping[str, Any]) -> None:
    """A teacher part of an init file (keys without ``teacher.``) that is another detector, or has
    another class count, than the config's teacher: a :class:`CheckpointMismatchError` saying so."""
    if not state_dict:
        return
    description = describe_state_dict(state_dict)
    adapter = adapter_for(teacher, default=None)
    family = adapter.name if adapter is not None else None
    names = "|".join(re.escape(a.name) for a in ADAPTERS.values())
    found = re.search(f"({names})", description) if names else None
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


def missing_keys(model: nn.Module, converted: Mapping[str, Tensor], part: str) -> List[str]:
    """The keys of ``model`` (the distiller's ``part``) that ``converted`` lacks as ``<part>.<key>``."""
    return [k for k in model.state_dict().keys() if f"{part}.{k}" not in converted]


def _teacher_missing_message(missing: Sequence[str]) -> str:
    shown = "\n  ".join(missing[:50])
    more = f"\n  ... and {len(missing) - 50} more" if len(missing) > 50 else ""
    return (
        f"the init checkpoint leaves {len(missing)} teacher keys missing (a teacher must load completely):"
        f"\n  {shown}{more}\nCheck that --input2 of merge_weight.py is a checkpoint of the teacher named in "
        "the config (same detector, depth and num_classes)."
    )


def convert_init_state_dict(
    state_dict: Mapping[str, Tensor],
    student: nn.Module,
    teacher: nn.Module,
    convert_method_keys: Optional[MethodKeyConverter] = None,
) -> Dict[str, Tensor]:
    """A merged init file or a distiller checkpoint -> the distiller's keys. Each part goes through
    its own detector's adapter (parts already in the model's naming, e.g. a saved distiller, are
    kept as they are); ``methods.*`` stay; ``distill_criterion.*`` go through
    ``convert_method_keys`` (prefix removed; it returns ``methods.<i>.*`` keys); un-prefixed keys
    are dropped.

    Raises :class:`CheckpointMismatchError` when the file has no student/teacher keys, when the
    teacher part is another detector or class count, or when it would leave any teacher key missing
    (the message lists the keys).
    """
    parts = split_init_state_dict(state_dict)
    if not parts["student"] and not parts["teacher"]:
        sample = ", ".join(list(state_dict)[:5])
        raise CheckpointMismatchError(
            "this checkpoint has no 'student.'/'teacher.' keys, so it is not a distillation init file "
            f"(first keys: {sample}; it looks like {describe_state_dict(state_dict)}). Build one with merge_weight.py "
            "--input1 <student backbone> --input2 <teacher checkpoint> and pass it as train.init_checkpoint"
        )
    out: Dict[str, Tensor] = {}
    for part, model in (("student", student), ("teacher", teacher)):
        sub = parts[part]
        native = set(sub) <= set(model.state_dict().keys())  # e.g. a distiller checkpoint
        if part == "teacher":
            check_teacher_state_dict(model, sub)  # another detector / class count, named
        if sub and not native:
            adapter = adapter_for(model, default=None)
            if adapter is not None:
                sub = adapter.to_ours(sub)
        out.update({f"{part}.{k}": v for k, v in sub.items()})
    out.update({f"methods.{k}": v for k, v in parts["methods"].items()})
    if convert_method_keys is not None:
        out.update(convert_method_keys(parts["distill_criterion"]))
    missing_teacher = missing_keys(teacher, out, "teacher")
    if missing_teacher:
        raise CheckpointMismatchError(_teacher_missing_message(missing_teacher))
    return out


def check_student_backbone(student: nn.Module, converted: Mapping[str, Tensor]) -> List[str]:
    """The student's missing keys; :class:`CheckpointMismatchError` if any of them is a backbone key."""
    student_missing = missing_keys(student, converted, "student")
    # BatchNorm's num_batches_tracked is a counter, not a weight (merge_weight.py leaves it out)
    backbone_missing = [k for k in student_missing
                        if k.startswith("backbone.") and not k.endswith("num_batches_tracked")]
    if backbone_missing:
        raise CheckpointMismatchError(
            f"the init checkpoint leaves {len(backbone_missing)} student backbone keys missing, e.g. "
            f"{backbone_missing[:5]}; build it with merge_weight.py from an ImageNet ResNet of the student's depth"
        )
    return student_missing


def load_distill_init_checkpoint(
    model: nn.Module,
    checkpoint: Union[str, os.PathLike, Mapping[str, Tensor]],
    student: nn.Module,
    teacher: nn.Module,
    convert_method_keys: Optional[MethodKeyConverter] = None,
) -> Dict[str, List[str]]:
    """Load a merged init file (path or state dict) into the distiller ``model`` (whose parts are
    ``student`` and ``teacher``) with the policy of the module docstring.

    Returns the report ``{"student_missing", "methods_missing", "unexpected", "dropped"}``.
    """
    if isinstance(checkpoint, Mapping):
        state_dict = dict(checkpoint)
    else:
        from .merge import load_state_dict_file

        state_dict = load_state_dict_file(checkpoint)
    dropped = sorted(split_init_state_dict(state_dict)["other"])
    converted = convert_init_state_dict(state_dict, student, teacher, convert_method_keys)
    own = model.state_dict()
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in converted.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if mismatched:
        raise CheckpointMismatchError("init checkpoint shapes do not match the model:\n  " + "\n  ".join(mismatched))
    student_missing = check_student_backbone(student, converted)
    incompatible = model.load_state_dict(converted, strict=False)
    report = {
        "student_missing": student_missing,
        "methods_missing": [k for k in incompatible.missing_keys if k.startswith("methods.")],
        "unexpected": list(incompatible.unexpected_keys),
        "dropped": dropped,
    }
    logger.info(
        "Loaded distillation init checkpoint: teacher complete; student missing %d non-backbone keys "
        "(freshly initialised); %d unexpected keys; %d un-prefixed keys dropped.",
        len(student_missing),
        len(report["unexpected"]),
        len(dropped),
    )
    return report
