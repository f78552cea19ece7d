"""Merge a student backbone and a teacher checkpoint into one distillation init checkpoint.

The merged file is a flat state dict in the reference toolbox's naming, so files made by the
original ``merge_weight.py`` load too:

* the student backbone as ``student.backbone.<detectron2 ResNet name>``; a torchvision ImageNet
  file (``conv1``, ``layer1`` ...), a detectron2-named backbone (``stem``, ``res2`` ..., with or
  without ``backbone.``) or keys already under ``student.`` are accepted;
* every teacher key under ``teacher.`` (detrex naming, as in the official checkpoints);
* the teacher's level embeddings copied to ``student.<key>`` (docs/methods.md#initial-weights: the student's level
  embedding starts from the teacher's).

Unlike the reference, the un-prefixed student keys are not duplicated and every key is reported.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Union

import torch
from torch import Tensor

from .detrex import read_checkpoint
from .files import atomic_torch_save
from ..modeling.backbone import ResNet, torchvision_to_detectron2_resnet_keys

StateDict = Dict[str, Tensor]


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

    def summary(self) -> str:
        lines = [
            f"student backbone (ResNet-{self.backbone_depth}): {len(self.student_backbone)} keys mapped",
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
            lines.append(f"NOT matched, not a ResNet-{self.backbone_depth} key ({len(self.backbone_unexpected)}): "
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


def merge_weights(student: Mapping[str, Tensor], teacher: Mapping[str, Tensor]) -> tuple[StateDict, MergeReport]:
    """Merge ``student`` backbone weights and ``teacher`` detector weights (see module docstring)."""
    report = MergeReport()
    merged: StateDict = {}
    backbone: StateDict = {}
    for key, value in student.items():
        if key.startswith("student."):
            merged[key] = value
            (report.student_backbone if key.startswith("student.backbone.") else report.student_other).append(key)
            continue
        if key.startswith("fc.") or key.endswith("num_batches_tracked"):
            report.dropped.append(key)
            continue
        backbone[key[len("backbone."):] if key.startswith("backbone.") else key] = value
    backbone = torchvision_to_detectron2_resnet_keys(backbone)
    depth = _backbone_depth(backbone)
    report.backbone_depth = depth
    if backbone:
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
