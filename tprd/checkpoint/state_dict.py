"""Read a state dict from any checkpoint file and load it key by key, reporting every key.

A checkpoint is ``{"model": state_dict, ...}`` (``.pth``) or a pickled dict (``.pkl``, numpy
arrays); :func:`read_checkpoint` gives the flat state dict of either. :func:`load_state_dict_checked`
loads one into a module; with ``strict=True`` any missing or unexpected key, or any shape mismatch,
is an error naming the keys. Official detrex checkpoints go through their detector's adapter first
(:func:`tprd.checkpoint.detrex.load_detrex_checkpoint`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from .files import CheckpointFileError, read_weight_file

__all__ = ["LoadReport", "CheckpointMismatchError", "StateSource", "read_checkpoint", "compare_state_dict",
           "load_state_dict_checked", "load_torchvision_backbone"]

StateSource = Union[str, os.PathLike, Mapping[str, Any]]


class CheckpointMismatchError(ValueError, RuntimeError):
    """Keys or shapes of a checkpoint do not match the model (a ``ValueError`` and, as before, a
    ``RuntimeError``)."""


@dataclass
class LoadReport:
    """What a load did: keys loaded, keys the model has but the checkpoint lacks, keys the checkpoint
    has but the model lacks, and ``(key, checkpoint shape, model shape)`` mismatches."""

    matched: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    shape_mismatch: List[Tuple[str, tuple, tuple]] = field(default_factory=list)
    source: str = ""

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.shape_mismatch)

    def summary(self, limit: int = 20) -> str:
        lines = [f"checkpoint {self.source or '<state dict>'}: {len(self.matched)} keys loaded"]

        def block(title, items):
            if items:
                shown = [str(i) for i in items[:limit]]
                more = f" ... (+{len(items) - limit} more)" if len(items) > limit else ""
                lines.append(f"{title} ({len(items)}): " + ", ".join(shown) + more)

        block("missing in checkpoint", self.missing)
        block("unexpected in checkpoint", self.unexpected)
        block("shape mismatch (key, checkpoint, model)", self.shape_mismatch)
        return "\n".join(lines)


def _to_tensor(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    return value


def read_checkpoint(source: StateSource) -> Dict[str, Tensor]:
    """A flat state dict from a path (read by :func:`~tprd.checkpoint.files.read_weight_file`:
    ``.pkl`` pickles with latin1, numpy -> tensors; otherwise ``torch.load``) or a mapping; a top-level ``"model"`` (or ``"state_dict"``) entry is unwrapped."""
    data = source if isinstance(source, Mapping) else read_weight_file(source)
    for wrapper in ("model", "state_dict"):
        if isinstance(data, Mapping) and wrapper in data and isinstance(data[wrapper], Mapping):
            data = data[wrapper]
            break
    if not isinstance(data, Mapping):
        raise CheckpointFileError(
            f"checkpoint {source if not isinstance(source, Mapping) else '<mapping>'}: its 'model' entry "
            f"is a {type(data).__name__}, not a state dict",
            "" if isinstance(source, Mapping) else os.fspath(source),
        )
    converted = {k: _to_tensor(v) for k, v in data.items()}
    return {k: v for k, v in converted.items() if isinstance(v, Tensor)}


def compare_state_dict(module: nn.Module, state_dict: Mapping[str, Tensor],
                       source: str = "") -> Tuple[LoadReport, Dict[str, Tensor]]:
    """What loading ``state_dict`` into ``module`` would do, without loading: the report and the
    loadable entries (present in both, same shape)."""
    own = module.state_dict()
    report = LoadReport(source=source)
    report.missing = [k for k in own if k not in state_dict]
    report.unexpected = [k for k in state_dict if k not in own]
    loadable = {}
    for k, v in state_dict.items():
        if k not in own:
            continue
        if tuple(v.shape) != tuple(own[k].shape):
            report.shape_mismatch.append((k, tuple(v.shape), tuple(own[k].shape)))
            continue
        loadable[k] = v
        report.matched.append(k)
    return report, loadable


def load_state_dict_checked(module: nn.Module, state_dict: Mapping[str, Tensor], strict: bool = True,
                            source: str = "") -> LoadReport:
    """Load ``state_dict`` into ``module`` key by key, reporting; ``strict``: raise on any mismatch."""
    report, loadable = compare_state_dict(module, state_dict, source)
    if strict and not report.ok:
        raise CheckpointMismatchError(
            report.summary()
            + "\nThe checkpoint does not fit this model: check num_classes, backbone depth, "
            "with_box_refine / as_two_stage, or load with strict=False."
        )
    module.load_state_dict(loadable, strict=False)
    return report


def load_torchvision_backbone(backbone: nn.Module, path_or_sd: StateSource) -> LoadReport:
    """Load a torchvision ImageNet ResNet state dict (e.g. ``resnet18-f37072fd.pth``) into our
    :class:`~tprd.modeling.backbone.ResNet`; ``fc.*`` and ``num_batches_tracked`` are ignored, every
    other key must match."""
    sd = read_checkpoint(path_or_sd)
    sd = {k: v for k, v in sd.items() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    source = "" if isinstance(path_or_sd, Mapping) else os.fspath(path_or_sd)
    return load_state_dict_checked(backbone, sd, strict=True, source=source)
