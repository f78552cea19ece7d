"""Decoder attention maps of one query group, the same way for every detector.

A detector asked for ``return_attention=True`` puts per-layer taps in its outputs (see
:func:`tprd.modeling.detector.attention_taps`): ``decoder_self_attn`` (per-head softmax weights
before dropout over all decoded queries) and ``decoder_cross_attn`` (deformable sampling
locations + weights for Deformable DETR / DINO, dense weights over the ``S`` memory tokens for
DAB-DETR). All query groups (main, teacher queries, DINO's denoising queries ...) are decoded in
one pass behind a block-diagonal self-attention mask; ``taps["group_slices"]`` gives each
group's query range, and the functions here cut a group out before aggregating:

* :func:`self_attention_maps` -> ``[L,B,M,Q,Q]``, the group's diagonal block (rows and columns);
* :func:`cross_attention_maps` -> ``[L,B,M,S]`` (``reduce="head"``: per head, summed over the
  group's queries, levels and points) or ``[L,B,Q,S]`` (``reduce="query"``: per query, summed over
  heads, levels and points). Deformable layers are splatted with B6
  (:func:`~tprd.distill.splat.splat_deformable_attention`); dense layers are plain sums.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor

from tprd.modeling.outputs import DetectorOutputs

from .splat import SPLAT_REDUCTIONS, splat_deformable_attention

__all__ = ["group_slice", "cross_attention_map", "self_attention_maps", "cross_attention_maps"]


def group_slice(outputs: DetectorOutputs, group: str) -> slice:
    """Query range of ``group`` among all decoded queries (``taps["group_slices"]``)."""
    slices = outputs.taps.get("group_slices")
    if slices is None:
        raise KeyError("the detector outputs have no taps['group_slices']; the detector must report its query groups")
    if group not in slices:
        raise KeyError(f"query group {group!r} was not decoded; decoded groups: {list(slices)}")
    return slices[group]


def _layer_taps(outputs: DetectorOutputs, key: str) -> list:
    taps = outputs.taps.get(key)
    if taps is None:
        raise KeyError(
            f"the detector outputs have no taps[{key!r}]: run forward_outputs(..., return_attention=True) "
            "(a distillation method asks for it with 'attention' in needs / student_needs)"
        )
    return taps


def cross_attention_map(tap: Mapping[str, Any], reduce: str, queries: slice = slice(None)) -> Tensor:
    """One decoder layer's cross-attention tap -> ``[B,M,S]`` (``reduce="head"``) or ``[B,Q,S]``
    (``reduce="query"``) over the queries ``queries`` of the decoded sequence."""
    if reduce not in SPLAT_REDUCTIONS:
        raise ValueError(f"reduce must be one of {SPLAT_REDUCTIONS}, got {reduce!r}")
    kind = tap.get("kind")
    if kind == "deformable":
        return splat_deformable_attention(
            tap["sampling_locations"][:, queries], tap["attention_weights"][:, queries],
            tap["spatial_shapes"], tap["level_start_index"], reduce,
        )
    if kind == "dense":
        weights = tap["attention_weights"][:, :, queries]  # [B,M,Q,S]
        return weights.sum(2) if reduce == "head" else weights.sum(1)
    raise ValueError(f"unknown cross-attention tap kind {kind!r} (expected 'deformable' or 'dense')")


def _layers(n: int, layers: Optional[Sequence[int]]) -> Sequence[int]:
    return range(n) if layers is None else list(layers)


def self_attention_maps(outputs: DetectorOutputs, group: str = "main",
                        layers: Optional[Sequence[int]] = None) -> Tensor:
    """``[L',B,M,Q,Q]``: the decoder self-attention weights of ``group`` with itself, per layer
    (all layers, or the 0-based ``layers``)."""
    taps = _layer_taps(outputs, "decoder_self_attn")
    s = group_slice(outputs, group)
    return torch.stack([taps[l][:, :, s, s] for l in _layers(len(taps), layers)])


def cross_attention_maps(outputs: DetectorOutputs, reduce: str, group: str = "main",
                         layers: Optional[Sequence[int]] = None) -> Tensor:
    """``[L',B,M,S]`` (``reduce="head"``) or ``[L',B,Q,S]`` (``reduce="query"``): the aggregated
    cross-attention of ``group`` per layer (all layers, or only the 0-based ``layers``: the others
    are not computed)."""
    taps = _layer_taps(outputs, "decoder_cross_attn")
    s = group_slice(outputs, group)
    return torch.stack([cross_attention_map(taps[l], reduce, s) for l in _layers(len(taps), layers)])
