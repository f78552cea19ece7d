"""Load official RT-DETRv2 checkpoints (lyuwenyu/RT-DETR ``rtdetrv2_pytorch``) into
:class:`~tprd.modeling.rt_detr.RTDETR` (docs/rt_detr.md).

Our module names equal the reference's, so the checkpoint's keys load 1:1, strictly. A file (or an
already loaded dict) nests the weights as the reference's loaders expect them:
``ckpt["ema"]["module"]`` when it exists (the EMA weights, behind every released number), else
``ckpt["model"]`` (also our own training checkpoints, whose ``"ema"`` holds the averaged tensors by
name); a flat state dict is accepted as it is. :func:`rtdetr_checkpoint` writes that layout.

Buffers that are constants of the configuration travel in the checkpoints too:
``decoder.anchors [1,S,4]`` / ``decoder.valid_mask [1,S,1]`` (computed for the model's
``eval_spatial_size``, 640x640 in every official file: S = 8400) and
``decoder.decoder.layers.<i>.cross_attn.num_points_scale``. As in the reference, a strict load needs a
model built with the same ``eval_spatial_size``; ``constant_buffers="model"`` instead keeps the
model's own values (after checking that the checkpoint's ``num_points_scale`` agree), so a
checkpoint loads into a model cached for another size. ``num_batches_tracked`` entries of
frozen-BN layers (R50/R101 backbones) are dropped, as the reference's ``FrozenBatchNorm2d`` does.

The parity fixtures' fill (``crc32-randn-v1`` in RT-DETR's variant) is test code:
:func:`tprd.testing.rtdetr_parity.fill_rtdetr_state_dict`.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .state_dict import CheckpointMismatchError, LoadReport, compare_state_dict
from .files import CheckpointFileError, read_weight_file

__all__ = [
    "load_rtdetr_checkpoint",
    "read_rtdetr_checkpoint",
    "rtdetr_checkpoint",
    "rtdetr_key_report",
    "RTDETR_CONSTANT_BUFFERS",
]

StateSource = Union[str, os.PathLike, Mapping[str, Any]]

#: leaf names of the buffers that are constants of the configuration (not learned)
RTDETR_CONSTANT_BUFFERS = ("anchors", "valid_mask", "num_points_scale")


def _leaf(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def read_rtdetr_checkpoint(source: StateSource) -> Dict[str, Tensor]:
    """The model state dict of an RT-DETR checkpoint file or loaded dict: ``["ema"]["module"]`` if
    there is such an entry, else ``["model"]`` (also our own checkpoints, whose ``"ema"`` is the
    averaged tensors by name), else the mapping itself (a flat state dict)."""
    name = "<mapping>" if isinstance(source, Mapping) else os.fspath(source)
    data = source if isinstance(source, Mapping) else read_weight_file(source)
    if not isinstance(data, Mapping):
        raise CheckpointFileError(f"checkpoint {name}: holds a {type(data).__name__}, not a dict", name)
    ema = data.get("ema")
    if isinstance(ema, Mapping) and isinstance(ema.get("module"), Mapping):
        data = ema["module"]
    elif "model" in data and isinstance(data["model"], Mapping):
        # also this toolbox's own checkpoints, whose "ema" entry holds only the averaged tensors
        # (train.model_ema applies it on evaluation)
        data = data["model"]
    elif ema is not None:
        raise CheckpointFileError(f"checkpoint {name}: 'ema' has no 'module' state dict "
                                  f"(keys: {sorted(ema) if isinstance(ema, Mapping) else type(ema).__name__}) "
                                  "and there is no 'model' entry", name)
    state = {k: v for k, v in data.items() if isinstance(v, Tensor)}
    if not state:
        raise CheckpointFileError(f"checkpoint {name}: no tensors found (top-level keys: {sorted(data)[:10]})", name)
    return state


def rtdetr_checkpoint(model: Mapping[str, Tensor], ema: Optional[Mapping[str, Tensor]] = None,
                      ema_updates: Optional[int] = None) -> Dict[str, Any]:
    """A checkpoint nested as the reference's training checkpoints: ``{"model": model}`` plus
    ``"ema": {"module": ema, "updates": n}`` when there is an EMA. The reference's inference loaders
    and ``--tuning`` take ``["ema"]["module"]`` when it exists, else ``["model"]``; its ``--resume``
    loads both strictly (``ModelEMA.load_state_dict``; ``updates`` optional). Both state dicts must
    have the same keys (each a complete model)."""
    out: Dict[str, Any] = {"model": dict(model)}
    if ema is not None:
        differ = sorted(set(model) ^ set(ema))
        if differ:
            raise ValueError(f"the EMA and the model weights must have the same keys; they differ in {differ[:5]}")
        out["ema"] = {"module": dict(ema)}
        if ema_updates is not None:
            out["ema"]["updates"] = int(ema_updates)
    return out


def _frozen_bn_prefixes(model: nn.Module) -> List[str]:
    from ..modeling.presnet import FrozenBatchNorm2d

    return [name + "." if name else "" for name, m in model.named_modules() if isinstance(m, FrozenBatchNorm2d)]


def load_rtdetr_checkpoint(model: nn.Module, path_or_dict: StateSource, strict: bool = True,
                           constant_buffers: str = "strict") -> LoadReport:
    """Load an official RT-DETRv2 checkpoint into ``model`` (an :class:`RTDETR`).

    ``strict``: any missing / unexpected key or shape mismatch raises
    :class:`~tprd.checkpoint.detrex.CheckpointMismatchError` naming the keys (nothing is loaded);
    otherwise the matching entries load and the report lists the rest.
    ``constant_buffers``: ``"strict"`` (the reference: the checkpoint's ``anchors`` / ``valid_mask`` /
    ``num_points_scale`` must fit and are loaded) or ``"model"`` (keep the model's own values; the
    checkpoint's are checked for consistency where possible and otherwise ignored).
    Returns the :class:`~tprd.checkpoint.detrex.LoadReport`.
    """
    if constant_buffers not in ("strict", "model"):
        raise ValueError(f"constant_buffers must be 'strict' or 'model', got {constant_buffers!r}")
    source = "" if isinstance(path_or_dict, Mapping) else os.fspath(path_or_dict)
    state = dict(read_rtdetr_checkpoint(path_or_dict))
    for prefix in _frozen_bn_prefixes(model):
        state.pop(prefix + "num_batches_tracked", None)
    own = model.state_dict()
    if constant_buffers == "model":
        for key in [k for k in state if _leaf(k) in RTDETR_CONSTANT_BUFFERS]:
            value = state.pop(key)
            if _leaf(key) == "num_points_scale" and key in own and (
                    value.shape != own[key].shape or not torch.equal(value.to(own[key].dtype), own[key])):
                raise CheckpointMismatchError(
                    f"checkpoint {source or '<state dict>'}: {key} = {value.tolist()} but the model has "
                    f"{own[key].tolist()}: the number of sampling points per level (num_points) differs")
        state.update({k: v for k, v in own.items() if _leaf(k) in RTDETR_CONSTANT_BUFFERS})
    report, loadable = compare_state_dict(model, state, source)
    if strict and not report.ok:
        hint = ""
        if any(_leaf(k) in ("anchors", "valid_mask") for k, _, _ in report.shape_mismatch) or any(
                _leaf(k) in ("anchors", "valid_mask") for k in report.missing + report.unexpected):
            hint = ("\ndecoder.anchors / valid_mask are cached for the model's eval_spatial_size (the official "
                    "checkpoints: [640, 640]); build the model with that size, or load with "
                    "constant_buffers='model' to keep the model's own anchors.")
        raise CheckpointMismatchError(
            report.summary() + hint
            + "\nThe checkpoint does not fit this model: check num_classes, the backbone depth, the number of "
            "decoder layers and hidden_dim (use the config of the checkpoint's name), or load with strict=False.")
    model.load_state_dict(loadable, strict=False)
    return report


def rtdetr_key_report(model: nn.Module, key_rows: Iterable[Sequence]) -> LoadReport:
    """Compare the model's state-dict keys and shapes with ``[key, shape, dtype]`` rows (an official
    key list, ``rtdetr_keys/*.json``) without any weights. ``num_batches_tracked`` of frozen-BN layers
    is ignored, as on loading."""
    frozen = tuple(_frozen_bn_prefixes(model))
    own = model.state_dict(keep_vars=True)
    report = LoadReport(source="key list")
    listed = {}
    for key, shape, _ in key_rows:
        if key.endswith("num_batches_tracked") and key[: -len("num_batches_tracked")] in frozen:
            continue
        listed[key] = tuple(shape)
    report.missing = [k for k in own if k not in listed]
    report.unexpected = [k for k in listed if k not in own]
    for k, shape in listed.items():
        if k in own:
            if tuple(own[k].shape) != shape:
                report.shape_mismatch.append((k, shape, tuple(own[k].shape)))
            else:
                report.matched.append(k)
    return report
