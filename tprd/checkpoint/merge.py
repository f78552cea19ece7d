"""Merge a student backbone and a teacher checkpoint into one distillation init checkpoint.

The merged file is a flat state dict in the reference toolbox's naming, so files made by the
original ``merge_weight.py`` load too:

* the student backbone as ``student.backbone.<detectron2 ResNet name>``; a torchvision ImageNet
  file (``conv1``, ``layer1`` ...), a detectron2-named backbone (``stem``, ``res2`` ..., with or
  without ``backbone.``) or keys already under ``student.`` are accepted;
* every teacher key under ``teacher.`` (detrex naming, as in the official checkpoints);
* the teacher's level embeddings copied to ``student.<key>`` (docs/methods.md#initial-weights: the student's level
  embedding starts from the teacher's).

RT-DETR (docs/rt_detr.md#initial-weights): ``input1`` is the reference's ImageNet PResNet-vd file
(``res_layers.*`` names, the model's own: kept as ``student.backbone.<key>``), ``input2`` an official
RT-DETRv2 checkpoint, whose EMA weights (``ema/module``) are taken whenever the file has them.

Unlike the reference, the un-prefixed student keys are not duplicated and every key is reported.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Union

import torch
from torch import Tensor

from tprd.errors import UserError

from .state_dict import read_checkpoint
from .files import atomic_torch_save, read_weight_file
from ..modeling.backbone import ResNet, torchvision_to_detectron2_resnet_keys

StateDict = Dict[str, Tensor]


#: Entries a checkpoint may nest its weights under (checked in this order at each level).
NESTINGS = ("model", "state_dict", "ema", "module")


class MergeInputError(UserError):
    """An input of ``merge_weight.py`` that is not what it expects; nothing is written."""


def read_nested_state_dict(path: Union[str, os.PathLike]) -> tuple[StateDict, List[str]]:
    """The flat state dict of a weight file whose tensors may be nested under :data:`NESTINGS`
    (``{"model": ...}``, ``{"ema": {"module": ...}}``, keys prefixed ``module.`` by DDP), and the
    entries unwrapped. A file whose weights are under another entry is refused, naming its entries."""
    import numpy as np

    data = read_weight_file(path)
    trail: List[str] = []
    while True:
        if not isinstance(data, Mapping):
            raise MergeInputError(f"{os.fspath(path)}: holds a {type(data).__name__}, not a state dict")
        if any(isinstance(v, (Tensor, np.ndarray)) for v in data.values()):
            break
        nested = [k for k in NESTINGS if isinstance(data.get(k), Mapping)]
        ema = data.get("ema")
        if isinstance(ema, Mapping) and isinstance(ema.get("module"), Mapping):
            # RT-DETR's files: {"ema": {"module": weights, "updates": n}[, "model": ...]}; the reference
            # loads the EMA weights whenever they are there (every released number is theirs)
            nested = ["ema"]
        if not nested:
            where = "/".join(trail) or "the top level"
            raise MergeInputError(
                f"{os.fspath(path)}: no weights found at {where}: its entries are {list(data)[:10]}; the weights "
                f"must be a state dict, possibly nested under one of {', '.join(NESTINGS)}. Save the model's "
                "state_dict (torch.save(model.state_dict(), path)) or unwrap it first"
            )
        trail.append(nested[0])
        data = data[nested[0]]
    state = read_checkpoint(dict(data))
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
        trail.append("module. prefix")
    return state, trail


_DETECTOR = re.compile(r"(Deformable DETR|DINO|DAB-DETR|RT-DETR)")


def check_merge_inputs(student: Mapping[str, Tensor], teacher: Mapping[str, Tensor], input1: str, input2: str,
                       output: str = "") -> None:
    """``merge_weight.py``'s inputs: ``input1`` a backbone, ``input2`` a detector of a known kind,
    two different files, an output that is neither; :class:`MergeInputError` otherwise."""
    from .loading import describe_state_dict

    def same(a: str, b: str) -> bool:
        try:
            return os.path.samefile(a, b)
        except OSError:
            return os.path.abspath(a) == os.path.abspath(b)

    if same(input1, input2):
        raise MergeInputError(f"--input1 and --input2 are the same file ({input1}): input1 is the student's backbone, "
                              "input2 the teacher detector")
    if output and (same(output, input1) or same(output, input2)):
        raise MergeInputError(f"--output {output} would overwrite an input; write the merged file elsewhere")
    d1, d2 = describe_state_dict(student), describe_state_dict(teacher)
    backbone1, backbone2 = d1.startswith("a backbone-only"), d2.startswith("a backbone-only")
    student_merged = bool(student) and all(k.startswith("student.") for k in student)
    swapped = " The inputs look swapped: --input1 is the backbone, --input2 the teacher." if backbone2 and _DETECTOR.search(d1) else ""
    if not (backbone1 or student_merged):
        raise MergeInputError(
            f"--input1 {input1} looks like {d1}, not a backbone: --input1 must be the student's ImageNet ResNet "
            f"(torchvision resnet18-f37072fd.pth or a detectron2 R-18; for RT-DETR the PResNet-vd file "
            f"ResNet18_vd_pretrained_from_paddle.pth).{swapped}"
        )
    if not _DETECTOR.search(d2) or d2.startswith("a distillation"):
        raise MergeInputError(
            f"--input2 {input2} looks like {d2}, not a teacher detector: --input2 must be a Deformable DETR, DINO, "
            "DAB-DETR or RT-DETR checkpoint (detrex or the official RT-DETR release, or one trained with this toolbox, "
            "e.g. <run>/model_final.pth)."
            + (" The inputs look swapped." if backbone2 and not backbone1 else "")
        )


def load_state_dict_file(path: Union[str, os.PathLike]) -> StateDict:
    """Read a checkpoint file (``.pkl``: detectron2 pickle, latin1, numpy arrays; otherwise torch)
    into a flat state dict of tensors; a top-level ``"model"`` (or ``"state_dict"``) entry is
    unwrapped. A file that is not a checkpoint raises :class:`~tprd.checkpoint.CheckpointFileError`."""
    return read_checkpoint(path)


@dataclass
class MergeReport:
    student_backbone: List[str] = field(default_factory=list)
    student_other: List[str] = field(default_factory=list)
    teacher: List[str] = field(default_factory=list)
    level_embeds: List[str] = field(default_factory=list)
    dropped: List[str] = field(default_factory=list)
    backbone_missing: List[str] = field(default_factory=list)
    backbone_unexpected: List[str] = field(default_factory=list)
    backbone_depth: int = 0
    backbone_kind: str = "ResNet"

    @property
    def backbone_name(self) -> str:
        if not self.backbone_depth:  # student.* keys are taken as given; anything else was not recognised
            return f"{self.backbone_kind} of unrecognised depth" if self.backbone_unexpected else "student.* keys as given"
        return f"{self.backbone_kind}-{self.backbone_depth}" + ("vd" if self.backbone_kind == "PResNet" else "")

    def summary(self) -> str:
        lines = [
            f"student backbone ({self.backbone_name}): {len(self.student_backbone)} keys mapped",
            f"student, other keys kept: {len(self.student_other)}",
            f"teacher: {len(self.teacher)} keys",
            f"level embeddings copied teacher -> student: {', '.join(self.level_embeds) or 'none'}",
        ]
        if self.dropped:
            lines.append(f"dropped from input1 ({len(self.dropped)}): {', '.join(self.dropped[:10])}"
                         + (" ..." if len(self.dropped) > 10 else ""))
        if self.backbone_missing:
            lines.append(f"NOT matched, missing from the student backbone ({len(self.backbone_missing)}): "
                         + ", ".join(self.backbone_missing[:10]) + (" ..." if len(self.backbone_missing) > 10 else ""))
        if self.backbone_unexpected:
            lines.append(f"NOT matched, not a {self.backbone_name} key ({len(self.backbone_unexpected)}): "
                         + ", ".join(self.backbone_unexpected[:10]))
        if not self.backbone_missing and not self.backbone_unexpected:
            lines.append("student backbone: every key matched")
        return "\n".join(lines)


def _backbone_depth(d2_keys) -> int:
    blocks = {k.split(".")[0] + "." + k.split(".")[1] for k in d2_keys if k.startswith("res")}
    has_conv3 = any(".conv3." in k for k in d2_keys)
    counts = [sum(1 for b in blocks if b.startswith(f"res{i}.")) for i in range(2, 6)]
    table = {(False, (2, 2, 2, 2)): 18, (False, (3, 4, 6, 3)): 34, (True, (3, 4, 6, 3)): 50, (True, (3, 4, 23, 3)): 101}
    return table.get((has_conv3, tuple(counts)), 0)


def _presnet_depth(keys) -> int:
    """Depth of a PResNet-vd state dict (RT-DETR's backbone) from its blocks per stage, 0 if unknown."""
    blocks = {tuple(k.split(".")[1:4:2]) for k in keys if k.startswith("res_layers.")}
    counts = tuple(sum(1 for stage, _ in blocks if stage == str(i)) for i in range(4))
    bottleneck = any(".branch2c." in k for k in keys)
    table = {(False, (2, 2, 2, 2)): 18, (False, (3, 4, 6, 3)): 34, (True, (3, 4, 6, 3)): 50, (True, (3, 4, 23, 3)): 101}
    return table.get((bottleneck, counts), 0)


def is_presnet_state_dict(state_dict: Mapping[str, Tensor]) -> bool:
    """A PResNet-vd backbone (RT-DETR's ImageNet file, ``res_layers.*`` names), optionally under ``backbone.``."""
    return any(k.startswith(("res_layers.", "backbone.res_layers.")) for k in state_dict)


def _merge_presnet(student: Mapping[str, Tensor], merged: StateDict, report: MergeReport) -> None:
    """RT-DETR's student backbone: the PResNet-vd keys are the model's own (``student.backbone.<key>``)."""
    from ..modeling.presnet import PResNet

    backbone = {}
    for key, value in student.items():
        if key.endswith("num_batches_tracked") or key.startswith("fc."):
            report.dropped.append(key)
            continue
        backbone[key[len("backbone."):] if key.startswith("backbone.") else key] = value
    depth = _presnet_depth(backbone)
    report.backbone_depth = depth
    report.backbone_kind = "PResNet"
    if depth:
        expected = {k for k in PResNet(depth=depth, variant="d", freeze_at=-1, freeze_norm=False).state_dict()
                    if not k.endswith("num_batches_tracked")}
        report.backbone_missing = sorted(expected - set(backbone))
        report.backbone_unexpected = sorted(set(backbone) - expected)
    else:
        report.backbone_unexpected = sorted(backbone)
    for key, value in backbone.items():
        merged["student.backbone." + key] = value
        report.student_backbone.append("student.backbone." + key)


def merge_weights(student: Mapping[str, Tensor], teacher: Mapping[str, Tensor]) -> tuple[StateDict, MergeReport]:
    """Merge ``student`` backbone weights and ``teacher`` detector weights (see module docstring)."""
    report = MergeReport()
    merged: StateDict = {}
    backbone: StateDict = {}
    if is_presnet_state_dict(student) and not any(k.startswith("student.") for k in student):
        _merge_presnet(student, merged, report)
        student = {}
    for key, value in student.items():
        if key.startswith("student."):
            merged[key] = value
            (report.student_backbone if key.startswith("student.backbone.") else report.student_other).append(key)
            continue
        if key.startswith("fc.") or key.endswith("num_batches_tracked"):
            report.dropped.append(key)
            continue
        backbone[key[len("backbone."):] if key.startswith("backbone.") else key] = value
    if backbone:
        backbone = torchvision_to_detectron2_resnet_keys(backbone)
        depth = _backbone_depth(backbone)
        report.backbone_depth = depth
        if depth:
            expected = set(torchvision_to_detectron2_resnet_keys(ResNet(depth).state_dict()))
            report.backbone_missing = sorted(expected - set(backbone))
            report.backbone_unexpected = sorted(set(backbone) - expected)
        else:
            report.backbone_unexpected = sorted(backbone)
        for key, value in backbone.items():
            merged["student.backbone." + key] = value
            report.student_backbone.append("student.backbone." + key)
    for key, value in teacher.items():
        name = key if key.startswith("teacher.") else "teacher." + key
        merged[name] = value
        report.teacher.append(name)
        if "level_embeds" in key:
            plain = key[len("teacher."):] if key.startswith("teacher.") else key
            merged["student." + plain] = value.clone()
            report.level_embeds.append("student." + plain)
    return merged, report


def save_atomic(obj, path: Union[str, os.PathLike]) -> None:
    """``torch.save`` to a temporary file in the target folder, then rename over ``path``
    (:func:`~tprd.checkpoint.files.atomic_torch_save`: the umask's permissions, no partial file
    left behind)."""
    atomic_torch_save(obj, os.fspath(path))
