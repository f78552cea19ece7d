"""The student of a distillation checkpoint, on its own, in our naming or detrex's.

A distillation checkpoint holds the whole :class:`~tprd.distill.Distiller`: ``student.*``,
``teacher.*`` (and ``methods.*``) under ``"model"`` (ours, with optimizer, scheduler, iteration
and maybe ``"ema"`` next to it), or flat ``student.*`` / ``teacher.*`` keys in detrex naming (the
reference implementation's checkpoints and ``merge_weight.py`` init files). :func:`extract_student`
takes the student part, brings it to our naming through its detector's detrex adapter
(:mod:`tprd.checkpoint.detrex`) when it is in detrex naming, and :func:`student_to_detrex` converts it
back with the same adapter, checking that loading the result gives exactly
the tensors it started from.

Our ``"ema"`` entry (:class:`~tprd.engine.ema.ModelEMA`) holds only what the average changes: the
trainable parameters and the floating-point buffers of trainable modules. The student's EMA
weights are therefore the checkpoint's student with those entries replaced by their averages
(what :meth:`ModelEMA.applied` evaluates); integer buffers (``num_batches_tracked``), frozen
parts and constant buffers (RT-DETR's anchors) come from ``"model"``.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Type

import torch
from torch import Tensor

from .detrex import ADAPTERS, adapter_for, adapter_for_keys
from .state_dict import read_checkpoint
from .files import read_weight_file

__all__ = ["EMA_UPDATES_KEY", "StudentWeights", "read_raw_checkpoint", "detector_class_of", "is_detrex_naming",
           "extract_student", "student_to_detrex", "count_values"]

#: the EMA's update count inside our checkpoints' ``"ema"`` entry (written by
#: :class:`tprd.engine.ema.ModelEMA` when it has warmups)
EMA_UPDATES_KEY = "_ema_updates"


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
    return any(re.match(r"backbone\.(res\d|stem)\.", k) or ".attentions." in k or ".ffns." in k
               for k in state_dict)  # (RT-DETR's PResNet: backbone.res_layers.*, ours and official)


@dataclass
class StudentWeights:
    """The student in our naming, its detector class, and where it came from."""

    state_dict: Dict[str, Tensor]
    detector: Type
    source_naming: str  # "tprd" or "detrex"
    iteration: Optional[int] = None
    #: the complete student with the checkpoint's EMA averages in (``None``: no ``"ema"`` entry)
    ema_state_dict: Optional[Dict[str, Tensor]] = None
    #: the EMA's update count when the checkpoint stores it (with ``train.model_ema.warmups``)
    ema_updates: Optional[int] = None


def _student_ema(path: str, raw: Mapping[str, Any], student: Mapping[str, Tensor]):
    """The student with the averages of the checkpoint's ``"ema"`` entry in, and its update count."""
    entry = raw["ema"]
    if not isinstance(entry, Mapping):
        raise ValueError(f"checkpoint {path!r}: its 'ema' entry is a {type(entry).__name__}, not a state dict")
    averaged = {k[len("student."):]: v for k, v in entry.items() if k.startswith("student.") and isinstance(v, Tensor)}
    unknown = sorted(set(averaged) - set(student))
    if unknown:
        raise ValueError(f"checkpoint {path!r}: its 'ema' entry has student tensors the model part lacks, e.g. "
                         f"{unknown[:3]}; the file is not one checkpoint of one training run")
    if not averaged:
        raise ValueError(f"checkpoint {path!r}: its 'ema' entry holds no 'student.*' tensors (keys: "
                         f"{sorted(entry)[:5]}); extract without --ema")
    merged = dict(student)
    merged.update(averaged)
    updates = entry.get(EMA_UPDATES_KEY)
    return merged, (int(updates) if updates is not None else None)


def extract_student(path: str, ema: bool = False, detector: Optional[Type] = None) -> StudentWeights:
    """The ``student.*`` part of the distillation checkpoint at ``path`` in our naming (``ema``: the
    checkpoint's averaged weights as :attr:`StudentWeights.state_dict`; an error without an
    ``"ema"`` entry). ``detector``: the student's class (else from the keys). Whenever the
    checkpoint has an EMA, :attr:`StudentWeights.ema_state_dict` holds the averaged student."""
    raw = read_raw_checkpoint(path)
    if ema and "ema" not in raw:
        raise KeyError(f"checkpoint {path!r} has no 'ema' entry (trained without train.model_ema.enabled=True); "
                       "extract without --ema")
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
    averaged = updates = None
    if "ema" in raw:
        if naming != "tprd":
            raise ValueError(f"checkpoint {path!r}: an 'ema' entry next to weights in detrex naming is not a "
                             "checkpoint of this toolbox; remove the 'ema' entry or pass our own checkpoint")
        averaged, updates = _student_ema(path, raw, student)
    iteration = raw.get("iteration")
    return StudentWeights(averaged if ema else student, detector, naming,
                          int(iteration) if iteration is not None else None, averaged, updates)


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
