"""Optimizer parameter groups with per-parameter lr factors and weight decay (config-driven).

``get_default_optimizer_params`` gives every trainable parameter an lr of
``base_lr * lr_factor_func(full_parameter_name)`` and a weight decay (``weight_decay_norm`` for the
parameters of normalisation layers, ``weight_decay`` otherwise), then merges parameters with
equal settings into one group. Used from configs as::

    optimizer = L(torch.optim.AdamW)(
        params=L(get_default_optimizer_params)(base_lr="${..lr}", weight_decay_norm=0.0,
                                               lr_factor_func=backbone_lr_factor),
        lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-4)
    # before instantiate: cfg.optimizer.params.model = model

The lr factor functions of the three detector families (docs/methods.md#schedules, #diff-21):

* :func:`deformable_lr_factor` — Deformable DETR and DINO: backbone x0.1, parameters whose name
  contains ``reference_points`` or ``sampling_offsets`` x0.1, everything else x1;
* :func:`backbone_lr_factor` — DAB-DETR: backbone x0.1.

RT-DETR declares its groups by regular expressions on parameter names instead
(:func:`regex_optimizer_params`, ``configs/common/rtdetr_optim.py``).
"""
from __future__ import annotations

import logging
import re
from collections import defaultdict
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch

from tprd.config import instantiate

__all__ = [
    "get_default_optimizer_params",
    "backbone_lr_factor",
    "deformable_lr_factor",
    "regex_optimizer_params",
    "build_optimizer",
    "NORM_MODULE_TYPES",
]

logger = logging.getLogger("tprd.engine")

NORM_MODULE_TYPES = (
    torch.nn.BatchNorm1d,
    torch.nn.BatchNorm2d,
    torch.nn.BatchNorm3d,
    torch.nn.SyncBatchNorm,
    torch.nn.GroupNorm,
    torch.nn.InstanceNorm1d,
    torch.nn.InstanceNorm2d,
    torch.nn.InstanceNorm3d,
    torch.nn.LayerNorm,
    torch.nn.LocalResponseNorm,
)


def _is_norm(module: torch.nn.Module) -> bool:
    if isinstance(module, NORM_MODULE_TYPES):
        return True
    # FrozenBatchNorm2d, RMSNorm and other custom norm layers, recognised by class name.
    return re.search(r"Norm(\d[dD])?$", type(module).__name__) is not None


def backbone_lr_factor(name: str) -> float:
    """0.1 for parameters of a backbone (name contains ``backbone``), else 1."""
    return 0.1 if "backbone" in name else 1.0


def deformable_lr_factor(name: str) -> float:
    """0.1 for backbone, ``reference_points`` and ``sampling_offsets`` parameters, else 1."""
    if "backbone" in name or "reference_points" in name or "sampling_offsets" in name:
        return 0.1
    return 1.0


def get_default_optimizer_params(
    model: torch.nn.Module,
    base_lr: Optional[float] = None,
    weight_decay: Optional[float] = None,
    weight_decay_norm: Optional[float] = None,
    weight_decay_bias: Optional[float] = None,
    lr_factor_func: Optional[Callable[[str], float]] = None,
    overrides: Optional[Dict[str, Dict[str, float]]] = None,
) -> List[Dict[str, Any]]:
    """Parameter groups for a torch optimizer.

    Args:
        model: the module whose trainable parameters (``requires_grad``) are optimised; shared
            parameters are counted once (under their first name).
        base_lr: lr before factors (``None``: the optimizer's default ``lr``; then no factor can
            be applied).
        weight_decay: decay of ordinary parameters (``None``: the optimizer's default).
        weight_decay_norm: decay of normalisation-layer parameters (``None``: as ``weight_decay``).
        weight_decay_bias: decay of biases (``None``: as their layer).
        lr_factor_func: ``full_param_name -> factor`` applied to ``base_lr``.
        overrides: ``{param_name_in_module: {"lr": .., "weight_decay": ..}}`` (e.g. ``"bias"``).

    Returns a list of ``{"params": [...], "lr": .., "weight_decay": ..}`` with parameters of equal
    settings merged, in order of first appearance.
    """
    if lr_factor_func is not None and base_lr is None:
        raise ValueError("lr_factor_func needs base_lr (set params.base_lr, e.g. '${..lr}').")
    overrides = dict(overrides or {})
    seen = set()
    groups: Dict[tuple, List[torch.nn.Parameter]] = defaultdict(list)
    names: Dict[tuple, List[str]] = defaultdict(list)
    order: List[tuple] = []
    for module_name, module in model.named_modules():
        norm = _is_norm(module)
        for param_name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or p in seen:
                continue
            seen.add(p)
            full = f"{module_name}.{param_name}" if module_name else param_name
            hp: Dict[str, float] = {}
            if base_lr is not None:
                hp["lr"] = float(base_lr)
            if weight_decay is not None:
                hp["weight_decay"] = float(weight_decay)
            if norm and weight_decay_norm is not None:
                hp["weight_decay"] = float(weight_decay_norm)
            if param_name == "bias" and weight_decay_bias is not None:
                hp["weight_decay"] = float(weight_decay_bias)
            hp.update({k: float(v) for k, v in overrides.get(param_name, {}).items()})
            if lr_factor_func is not None:
                hp["lr"] *= float(lr_factor_func(full))
            key = tuple(sorted(hp.items()))
            if key not in groups:
                order.append(key)
            groups[key].append(p)
            names[key].append(full)
    out = []
    for key in order:
        group = {"params": groups[key]}
        group.update(dict(key))
        out.append(group)
        logger.debug(f"param group {dict(key)}: {len(groups[key])} tensors, e.g. {names[key][:3]}")
    return out


def regex_optimizer_params(
    model: torch.nn.Module,
    base_lr: float,
    weight_decay: float,
    groups: Sequence[Mapping[str, Any]] = (),
) -> List[Dict[str, Any]]:
    """Parameter groups chosen by regular expressions on full parameter names, the way RT-DETR's
    configs declare them (docs/rt_detr.md#training-recipe).

    ``groups``: ``[{"params": regex, "lr": .., "weight_decay": ..}, ...]``; a trainable parameter
    whose name the regex finds (``re.search``) takes that group's settings (the first group that
    finds it), the others ``base_lr`` / ``weight_decay``. Empty groups are left out; the default
    group comes last, as in the reference. A distiller's names (``student.backbone...``) work
    unchanged because the patterns search anywhere in the name.
    """
    compiled = [(re.compile(str(g["params"])), {k: float(v) for k, v in g.items() if k != "params"}) for g in groups]
    buckets: List[List[torch.nn.Parameter]] = [[] for _ in compiled]
    rest: List[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        for i, (pattern, _) in enumerate(compiled):
            if pattern.search(name):
                buckets[i].append(p)
                break
        else:
            rest.append(p)
    out = []
    for params, (_, hp) in zip(buckets, compiled):
        if params:
            out.append({"params": params, "lr": float(base_lr), "weight_decay": float(weight_decay), **hp})
    if rest:
        out.append({"params": rest, "lr": float(base_lr), "weight_decay": float(weight_decay)})
    return out


def build_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Instantiate ``cfg.optimizer`` after setting ``cfg.optimizer.params.model = model``."""
    cfg.optimizer.params.model = model
    return instantiate(cfg.optimizer)
