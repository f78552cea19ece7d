"""Loading ``train.init_checkpoint`` into a plain detector: pick the key naming, check, load, report.

Two policies (docs/workflow.md, "The detrex workflow"):

* **evaluation** (``strict=True``, ``--eval-only``): every model tensor must load. Missing model keys
  or shape mismatches are a :class:`~tprd.checkpoint.CheckpointMismatchError` before any inference,
  listing the keys (first 20 and a count), naming the checkpoint and the config and saying what the
  checkpoint looks like (:func:`describe_state_dict`). Extra checkpoint keys alone (an EMA copy, a
  teacher) are a note.
* **training init** (``strict=False``): partial loads are allowed (a backbone-only file, fresh
  heads), reported in one summary line: loaded N of M model tensors, missing and unexpected keys
  counted by module. It is an error when under :data:`MIN_LOADED_FRACTION` of the model's tensors
  load (the wrong file), or on any shape mismatch. Class heads of another class count
  (``class_embed``, DINO's ``label_enc``) are the one mismatch users intend when fine-tuning on
  another dataset: the error explains it, and ``train.init_skip_class_heads=True`` leaves those
  heads as initialised.

Key naming: the file's own names (this toolbox's checkpoints), the detrex naming through the
model's adapter (:mod:`tprd.checkpoint.detrex`; official detrex checkpoints), and for models with a ``backbone`` the
keys prefixed with ``backbone.`` (a torchvision ImageNet ResNet; ``fc.*`` dropped), also through the
converter (detectron2's ``R-50.pkl``). The naming matching the most model keys wins; ties keep the
file's own names.
"""
from __future__ import annotations

import logging
import re
from collections import Counter
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .detrex import adapter_for, adapter_for_keys
from .state_dict import CheckpointMismatchError, LoadReport, compare_state_dict

__all__ = [
    "MIN_LOADED_FRACTION",
    "CLASS_HEAD_KEYS",
    "describe_state_dict",
    "count_by_module",
    "choose_naming",
    "load_init_state_dict",
]

logger = logging.getLogger("tprd.checkpoint")

#: A training init load that fills under this fraction of the model's tensors is refused.
MIN_LOADED_FRACTION = 0.10
#: Key fragments of the tensors whose first dimension is the class count.
CLASS_HEAD_KEYS = ("class_embed", "label_enc", "enc_score_head", "dec_score_head", "denoising_class_embed")
_LIST_LIMIT = 20
_SKIP_OVERRIDE = "train.init_skip_class_heads=True"


# ------------------------------------------------------------------------------------ describing
def _is_class_head(key: str) -> bool:
    return any(part in key.split(".") for part in CLASS_HEAD_KEYS)


def _num_classes(state_dict: Mapping[str, Tensor]) -> Optional[int]:
    """The class count of the first class head (``class_embed[.0].weight`` rows), if any."""
    for key in sorted(state_dict):
        if re.fullmatch(r"(.*\.)?(class_embed(\.0)?|dec_score_head\.0|enc_score_head)\.weight", key) \
                and getattr(state_dict[key], "ndim", 0) == 2:
            return int(state_dict[key].shape[0])
    return None


_RESNET_KEY = re.compile(r"^(backbone\.)?(conv1|bn1|layer[1-4]|fc|stem|res[2-5]|res_layers)\.")


def describe_state_dict(state_dict: Mapping[str, Tensor]) -> str:
    """What a checkpoint looks like, from its key names: a distiller (``student.``/``teacher.``), a
    backbone only, a Deformable DETR / DINO / DAB-DETR detector in detrex's or this toolbox's naming
    (with its class count), an RT-DETR (official naming, which is this toolbox's), or an
    unrecognised state dict (with its first keys)."""
    keys = list(state_dict)
    if not keys:
        return "an empty state dict"
    heads = Counter(k.split(".", 1)[0] for k in keys)
    if heads["student"] or heads["teacher"]:
        parts = [p for p in ("student", "teacher") if heads[p]]
        return (f"a distillation checkpoint ({' and '.join(parts)} keys: a Distiller's checkpoint or a "
                "merge_weight.py init file), evaluated or trained with a distillation config")
    if all(_RESNET_KEY.match(k) for k in keys):
        if any(re.match(r"^(backbone\.)?res_layers\.", k) for k in keys):
            return f"a backbone-only checkpoint (a PResNet-vd, RT-DETR's ImageNet backbone, {len(keys)} tensors)"
        style = "detectron2" if any(re.match(r"^(backbone\.)?(stem|res[2-5])\.", k) for k in keys) else "torchvision"
        return f"a backbone-only checkpoint (a ResNet in {style} naming, {len(keys)} tensors)"
    joined = "\n".join(keys)
    adapter = adapter_for_keys(keys)
    family = adapter.describe(joined) if adapter is not None else ""
    if not family:
        return f"an unrecognised state dict of {len(keys)} tensors (first keys: {', '.join(keys[:5])})"
    detrex = re.search(r"^backbone\.(stem|res[2-5])\.|\.attentions\.\d+\.|\.ffns\.\d+\.", joined, re.M)
    naming = "a detrex" if detrex else "a TPRD (this toolbox's naming)"
    if adapter.official_naming_is_ours:
        naming = "an"  # e.g. "an RT-DETR checkpoint": official and our key names are the same
    classes = _num_classes(state_dict)
    return f"{naming} {family} checkpoint" + (f" with {classes} classes" if classes is not None else "")


def count_by_module(keys: Iterable[str]) -> str:
    """``"transformer 80, class_embed 12"``: keys counted by their first name component."""
    counts = Counter(k.split(".", 1)[0] for k in keys)
    return ", ".join(f"{name} {n}" for name, n in counts.most_common()) or "none"


def _listing(items: Sequence, limit: int = _LIST_LIMIT) -> str:
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (f" ... (+{len(items) - limit} more)" if len(items) > limit else "")


# ------------------------------------------------------------------------------------ naming
def choose_naming(model: nn.Module, raw: Mapping[str, Tensor]) -> Tuple[str, Dict[str, Tensor]]:
    """``(name, state dict)`` of the key naming under which ``raw`` matches the most model keys
    (see the module docstring); ``"its own key names"`` on ties."""
    own = set(model.state_dict().keys())
    if raw and all(k.startswith("module.") for k in raw):  # saved from a DDP wrapper
        raw = {k[len("module."):]: v for k, v in raw.items()}
    adapter = adapter_for(model, default=None)
    convert = adapter.to_ours if adapter is not None else None
    candidates: List[Tuple[str, Callable[[], Dict[str, Tensor]]]] = []
    if convert is not None:
        candidates.append(("detrex naming", lambda: convert(raw)))
    if isinstance(getattr(model, "backbone", None), nn.Module) and not any(k.startswith("backbone.") for k in raw):
        prefixed = {f"backbone.{k}": v for k, v in raw.items() if not k.startswith("fc.")}
        candidates.append(("a backbone-only checkpoint", lambda: prefixed))
        if convert is not None:
            candidates.append(("a detectron2-named backbone checkpoint", lambda: convert(prefixed)))
    best_name, best, best_hits = "its own key names", dict(raw), len(own & set(raw))
    for name, make in candidates:
        try:
            state_dict = make()
        except Exception as e:  # noqa: BLE001 - this naming does not apply to the file
            logger.debug(f"{name}: conversion failed: {e}")
            continue
        hits = len(own & set(state_dict))
        if hits > best_hits:
            best_name, best, best_hits = name, state_dict, hits
    return best_name, best


# ------------------------------------------------------------------------------------ policy
def _class_count_note(report: LoadReport, raw: Mapping[str, Tensor], model: nn.Module) -> str:
    """The explanation when every shape mismatch is a class head of another class count."""
    if not report.shape_mismatch or not all(_is_class_head(k) for k, _, _ in report.shape_mismatch):
        return ""
    theirs = _num_classes(raw)
    ours = _num_classes(model.state_dict())
    counts = f" ({theirs} in the checkpoint, {ours} in the model)" if theirs and ours else ""
    return f"the class heads are for another class count{counts}"


def _summary_line(report: LoadReport, total: int, naming: str, skipped: Sequence[str]) -> str:
    line = (f"Loaded {len(report.matched)} of {total} model tensors from {report.source} (as {naming}); "
            f"missing by module: {count_by_module(report.missing)}; "
            f"unexpected by module: {count_by_module(report.unexpected)}")
    if skipped:
        line += f"; {len(skipped)} class-head tensors left as initialised ({_SKIP_OVERRIDE})"
    return line


def _mismatch_details(report: LoadReport, total: int, description: str) -> List[str]:
    lines = []
    if report.missing:
        lines.append(f"  model tensors missing from the checkpoint ({len(report.missing)} of {total}): "
                     + _listing(report.missing))
    if report.shape_mismatch:
        lines.append(f"  shape mismatches ({len(report.shape_mismatch)}; key: checkpoint vs model): "
                     + _listing([f"{k}: {tuple(a)} vs {tuple(b)}" for k, a, b in report.shape_mismatch]))
    if report.unexpected:
        lines.append(f"  checkpoint keys the model does not have ({len(report.unexpected)}): "
                     + _listing(report.unexpected))
    lines.append(f"  the checkpoint looks like {description}")
    return lines


def _mismatch_error(header: str, report: LoadReport, total: int, description: str,
                    summary: str) -> CheckpointMismatchError:
    """The refusal: ``header``, the :func:`_mismatch_details` lines, then the one-line ``summary``."""
    return CheckpointMismatchError("\n".join([header] + _mismatch_details(report, total, description) + [summary]))


def load_init_state_dict(model: nn.Module, raw: Mapping[str, Tensor], *, source: str, strict: bool,
                         config_file: str = "", skip_class_heads: bool = False) -> LoadReport:
    """Load ``raw`` (a flat state dict read from ``source``) into ``model`` under the best naming,
    with the evaluation (``strict``) or the training-init policy of the module docstring.

    Raises :class:`CheckpointMismatchError` before loading anything when the policy refuses; the
    message's last line is a one-line summary naming the checkpoint and the config.
    """
    naming, state_dict = choose_naming(model, raw)
    report, loadable = compare_state_dict(model, state_dict, source=source)
    total = len(model.state_dict())
    what = f"{type(model).__name__}" + (f" of config {config_file}" if config_file else "")
    description = describe_state_dict(raw)
    class_note = _class_count_note(report, raw, model)

    skipped: List[str] = []
    if class_note and skip_class_heads and not strict:
        skipped = [k for k, _, _ in report.shape_mismatch]
        report.shape_mismatch = []
        report.missing = report.missing + skipped

    if strict and (report.missing or report.shape_mismatch):
        problems = ", ".join(p for p in (
            f"{len(report.missing)} of {total} model tensors missing" if report.missing else "",
            f"{len(report.shape_mismatch)} shape mismatches" if report.shape_mismatch else "") if p)
        if class_note:
            fix = f"{class_note}: evaluate with the config of the checkpoint's dataset (model.num_classes)"
        else:
            fix = "evaluate it with the config of the detector it was trained with"
        raise _mismatch_error(
            f"--eval-only loads every model tensor, and checkpoint {source} does not fit {what}:", report, total,
            description, f"--eval-only refused checkpoint {source} for {what}: {problems}; it looks like "
            f"{description}; {fix}")

    if not strict:
        fraction = len(report.matched) / max(total, 1)
        if report.shape_mismatch:
            if class_note:
                fix = (f"{class_note}; to fine-tune with fresh class heads add {_SKIP_OVERRIDE}, or set "
                       "model.num_classes to the checkpoint's count")
            else:
                fix = "the checkpoint is of another model size or variant; use a checkpoint of this config's model"
            raise _mismatch_error(
                f"train.init_checkpoint {source} does not fit {what}:", report, total, description,
                f"train.init_checkpoint {source} has {len(report.shape_mismatch)} tensors of another shape "
                f"than {what}: {fix}")
        if fraction < MIN_LOADED_FRACTION:
            raise _mismatch_error(
                f"train.init_checkpoint {source} does not fit {what}:", report, total, description,
                f"train.init_checkpoint {source} fills only {len(report.matched)} of {total} tensors of "
                f"{what} ({100 * fraction:.1f}%, under the {100 * MIN_LOADED_FRACTION:.0f}% minimum of a "
                f"training init load); it looks like {description}")

    for key in skipped:
        loadable.pop(key, None)
    model.load_state_dict(loadable, strict=False)
    partial = report.missing or (report.unexpected and not strict)
    (logger.warning if partial else logger.info)(_summary_line(report, total, naming, skipped))
    if strict and report.unexpected:
        logger.info(f"Note: {len(report.unexpected)} checkpoint keys are not used by {type(model).__name__} "
                    f"(by module: {count_by_module(report.unexpected)}), e.g. an EMA copy or a teacher")
    return report
