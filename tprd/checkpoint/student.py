"""The student of a distillation checkpoint, on its own, in our naming or detrex's.

A distillation checkpoint holds the whole :class:`~tprd.distill.Distiller`: ``student.*``,
``teacher.*`` (and ``methods.*``) under ``"model"`` (ours, with optimizer, scheduler, iteration
and maybe ``"ema"`` next to it), or flat ``student.*`` / ``teacher.*`` keys in detrex naming (the
reference implementation's checkpoints and ``merge_weight.py`` init files). :func:`extract_student`
takes the student part, brings it to our naming through its detector's detrex adapter
(:mod:`tprd.checkpoint.detrex`) when it is in detrex naming, and :func:`student_to_detrex` converts it
back with the same adapter, checking that loading the result gives exactly
the tensors it started from.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Type

import torch
from torch import Tensor

from .detrex import ADAPTERS, adapter_for, adapter_for_keys
from .state_dict import read_checkpoint
from .files import read_weight_file

__all__ = ["StudentWeights", "read_raw_checkpoint", "detector_class_of", "is_detrex_naming",
           "extract_student", "student_to_detrex", "count_values"]


def read_raw_checkpoint(path: str) -> Mapping[str, Any]:
    """The whole checkpoint file (model, and ``"ema"`` etc. next to it) through the shared reader
    :func:`tprd.checkpoint.files.read_weight_file`, which names the file in its errors."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist; pass the .pth file written by training "
                                "(e.g. output/<run>/model_final.pth)")
    return read_weight_file(path)


def detector_class_of(state_dict: Mapping[str, Tensor]) -> Type:
    """The detector class of a (student) state dict, from keys only one family has, in either
    naming (each adapter's :attr:`~tprd.checkpoint.detrex.DetrexAdapter.signature`: DAB-DETR's
    ``anchor_box_embed``, DINO's ``label_enc``, Deformable DETR's ``transformer.reference_points`` ...)."""
    adapter = adapter_for_keys(state_dict)
    if adapter is None:
        raise ValueError("cannot tell the detector of these weights (no key only one of the detectors "
                         f"{', '.join(a.name for a in ADAPTERS.values())} has); pass --config-file")
    return adapter.model_class


def is_detrex_naming(state_dict: Mapping[str, Tensor]) -> bool:
    """Whether keys use detrex/detectron2 names (``backbone.res2.*``, ``backbone.stem.*``,
    ``attentions.k`` / ``ffns.0`` in transformer layers) rather than ours."""
    return any(k.startswith(("backbone.res", "backbone.stem.")) or ".attentions." in k or ".ffns." in k
               for k in state_dict)


@dataclass
class StudentWeights:
    """The student in our naming, its detector class, and where it came from."""

    state_dict: Dict[str, Tensor]
    detector: Type
    source_naming: str  # "tprd" or "detrex"
    iteration: Optional[int] = None


def extract_student(path: str, ema: bool = False, detector: Optional[Type] = None) -> StudentWeights:
    """The ``student.*`` part of the distillation checkpoint at ``path`` in our naming (``ema``: the
    checkpoint's averaged weights). ``detector``: the student's class (else from the keys)."""
    raw = read_raw_checkpoint(path)
    if ema:
        if "ema" not in raw:
            raise KeyError(f"checkpoint {path!r} has no 'ema' entry (trained without train.model_ema.enabled=True); "
                           "extract without --ema")
        weights = read_checkpoint(raw["ema"])
    else:
        weights = read_checkpoint(raw)
    student = {k[len("student."):]: v for k, v in weights.items() if k.startswith("student.")}
    if not student:
        sample = ", ".join(list(weights)[:5]) or "none"
        raise ValueError(
            f"checkpoint {path!r} holds no student: it has no 'student.*' keys (first keys: {sample}). "
            "Pass a distillation checkpoint (output/<distillation run>/model_final.pth, or the reference "
            "code's student.*/teacher.* file); a plain detector checkpoint already is the detector alone"
        )
    detector = detector or detector_class_of(student)
    naming = "detrex" if is_detrex_naming(student) else "tprd"
    if naming == "detrex":
        student = adapter_for(detector).to_ours(student)
    iteration = raw.get("iteration")
    return StudentWeights(student, detector, naming, int(iteration) if iteration is not None else None)


def student_to_detrex(detector: Type, state_dict: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """``state_dict`` (ours) in detrex naming through the detector's adapter, checked: the adapter's
    :meth:`~tprd.checkpoint.detrex.DetrexAdapter.to_ours` of the result must give back exactly ``state_dict``."""
    adapter = adapter_for(detector)
    out = adapter.to_detrex(state_dict)
    back = adapter.to_ours(out)
    wrong = sorted(set(back) ^ set(state_dict)) or [k for k in state_dict if not torch.equal(back[k], state_dict[k])]
    if wrong:
        raise RuntimeError(f"{detector.__name__}: the detrex conversion does not round-trip for keys {wrong[:10]}")
    return out


def count_values(state_dict: Mapping[str, Tensor]) -> int:
    """Elements of the distinct tensors (a tensor saved under several names counts once)."""
    seen = {}
    for v in state_dict.values():
        seen[(v.data_ptr(), v.dtype, tuple(v.shape))] = v.numel()
    return sum(seen.values())
