"""detrex interop shared by the detectors: config nodes -> our modules, checkpoint keys -> ours.

Config builders take a resolved detrex LazyConfig node (a plain mapping with ``_target_``):
:func:`build_backbone`, :func:`build_neck`, :func:`build_position_embedding`,
:func:`build_matcher` (+ :func:`check_focal_loss`). Key helpers: :func:`convert_backbone_key`
(detectron2 ResNet names -> torchvision's), :func:`deformable_detrex_to_ours` /
:func:`deformable_alias_target` (the deformable transformer layer names used by Deformable DETR and
DINO) and :func:`convert_with_aliases`, which renames a whole state dict and collapses detrex's
aliases of one shared tensor after checking that they really hold the same values.

The way back (ours -> detrex, for ``tools/extract_student.py --format detrex``):
:func:`backbone_key_to_detrex`, :func:`deformable_ours_to_detrex` (inverse of
:func:`deformable_detrex_to_ours` for the kept keys), :func:`deformable_detrex_names` (a key's
detrex name and the aliases detrex also saves) and :func:`expand_to_detrex`.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch
from torch import Tensor

from ..layers.position_embedding import PositionEmbeddingSine
from .backbone import ChannelMapper, ResNet, _tv_to_d2, convert_detectron2_resnet_keys
from .matcher import HungarianMatcher

__all__ = [
    "config_target",
    "build_backbone",
    "build_neck",
    "build_position_embedding",
    "build_matcher",
    "check_focal_loss",
    "layer_kwargs",
    "DEFORMABLE_LAYER_ARGS",
    "convert_backbone_key",
    "deformable_detrex_to_ours",
    "deformable_alias_target",
    "convert_with_aliases",
    "backbone_key_to_detrex",
    "deformable_ours_to_detrex",
    "deformable_detrex_names",
    "expand_to_detrex",
]


# ============================================================================================
# Config nodes -> modules
# ============================================================================================


def config_target(node: Mapping[str, Any]) -> str:
    """The node's ``_target_`` as a string (``""`` if it has none)."""
    return str(node.get("_target_", ""))


def build_backbone(cfg: Mapping[str, Any], default_out_features: Sequence[str] = ("res3", "res4", "res5"),
                   allow_bn: bool = False) -> ResNet:
    """detectron2 ``ResNet(stem=..., stages=make_default_stages(depth, ...))`` or a detrex / our
    ``ResNet(depth=...)`` node -> :class:`~tprd.modeling.backbone.ResNet` (torchvision style:
    ``stride_in_1x1=True`` is refused). Only ``FrozenBN`` stages unless ``allow_bn`` (``"BN"``)."""
    target = config_target(cfg)
    norm = "FrozenBN"
    if "stages" in cfg:
        stages = cfg["stages"]
        if stages.get("stride_in_1x1", False):
            raise ValueError("detectron2 ResNet with stride_in_1x1=True (MSRA weights) is not supported; "
                             "torchvision-style ResNets put the stride on the 3x3 conv")
        norm = stages.get("norm", "FrozenBN")
        if norm != "FrozenBN" and not allow_bn:
            raise ValueError(f"only FrozenBN backbones are supported, got norm={stages.get('norm')!r}")
        depth = int(stages["depth"])
    elif "depth" in cfg:
        depth = int(cfg["depth"])
    else:
        raise ValueError(f"cannot build a backbone from config with _target_ {target!r}")
    return ResNet(depth=depth, out_features=tuple(cfg.get("out_features", default_out_features)),
                  freeze_at=int(cfg.get("freeze_at", 1)), norm=norm)


def build_neck(cfg: Mapping[str, Any]) -> ChannelMapper:
    """detrex ``ChannelMapper`` node (GroupNorm, no activation) -> ours."""
    in_features = list(cfg["in_features"])
    shapes = cfg["input_shapes"]
    in_channels = [int(shapes[f]["channels"]) for f in in_features]
    norm = cfg.get("norm_layer") or {}
    if cfg.get("activation") not in (None, "None"):
        raise ValueError("ChannelMapper with an activation is not supported")
    return ChannelMapper(
        in_channels=in_channels,
        out_channels=int(cfg.get("out_channels", 256)),
        num_outs=int(cfg.get("num_outs", len(in_channels))),
        kernel_size=int(cfg.get("kernel_size", 3)),
        num_groups=int(norm.get("num_groups", 32)),
        in_features=in_features,
    )


_SINE_ARGS = ("num_pos_feats", "temperature", "normalize", "scale", "eps", "offset")


def build_position_embedding(cfg: Mapping[str, Any], strict: bool = False) -> PositionEmbeddingSine:
    """detrex ``PositionEmbeddingSine`` node -> ours; other arguments are ignored, or refused
    (``TypeError``) when ``strict``."""
    unknown = sorted(k for k in cfg if k != "_target_" and k not in _SINE_ARGS)
    if strict and unknown:
        raise TypeError(f"PositionEmbeddingSine does not take {unknown}")
    return PositionEmbeddingSine(**{k: cfg[k] for k in _SINE_ARGS if k in cfg})


def check_focal_loss(cfg: Mapping[str, Any]) -> None:
    """Refuse a criterion node whose classification loss is not the sigmoid focal loss."""
    if cfg.get("loss_class_type", "focal_loss") != "focal_loss":
        raise ValueError(f"only the focal classification loss is supported, got {cfg.get('loss_class_type')!r}")


def build_matcher(cfg: Optional[Mapping[str, Any]]) -> HungarianMatcher:
    """detrex ``HungarianMatcher`` node (focal matching cost) -> ours."""
    m = cfg or {}
    if m.get("cost_class_type", "focal_loss_cost") != "focal_loss_cost":
        raise ValueError(f"only the focal matching cost is supported, got {m.get('cost_class_type')!r}")
    return HungarianMatcher(
        cost_class=float(m.get("cost_class", 2.0)), cost_bbox=float(m.get("cost_bbox", 5.0)),
        cost_giou=float(m.get("cost_giou", 2.0)), alpha=float(m.get("alpha", 0.25)), gamma=float(m.get("gamma", 2.0)),
    )


#: constructor arguments of the deformable encoder / decoder taken over from a detrex config node
DEFORMABLE_LAYER_ARGS = ("embed_dim", "num_heads", "feedforward_dim", "attn_dropout", "ffn_dropout", "num_layers",
                         "num_feature_levels")


def layer_kwargs(cfg: Mapping[str, Any], names: Sequence[str] = DEFORMABLE_LAYER_ARGS) -> Dict[str, Any]:
    """The entries of ``cfg`` named in ``names`` (those present)."""
    return {k: cfg[k] for k in names if k in cfg}


# ============================================================================================
# Checkpoint keys
# ============================================================================================


def convert_backbone_key(key: str) -> str:
    """A detectron2 ResNet key (``backbone.res2.0.conv1.norm.weight`` ...) in torchvision names."""
    return next(iter(convert_detectron2_resnet_keys({key: None})))


_ENC_LAYER = re.compile(r"^transformer\.encoder\.layers\.(\d+)\.(.*)$")
_DEC_LAYER = re.compile(r"^transformer\.decoder\.layers\.(\d+)\.(.*)$")
_HEAD = re.compile(r"^(class_embed|bbox_embed)\.(\d+)\.(.*)$")
_FFN = {"ffns.0.layers.0.0.": "ffn.linear1.", "ffns.0.layers.1.": "ffn.linear2."}
_ENC_TABLE = {"attentions.0.": "self_attn.", "norms.0.": "norm1.", "norms.1.": "norm2."}
_DEC_TABLE = {"attentions.0.attn.": "self_attn.", "attentions.1.": "cross_attn.",
              "norms.0.": "norm1.", "norms.1.": "norm2.", "norms.2.": "norm3."}


def _rename_layer_part(rest: str, table: Dict[str, str]) -> str:
    for old, new in list(table.items()) + list(_FFN.items()):
        if rest.startswith(old):
            return new + rest[len(old):]
    raise KeyError(rest)


def deformable_detrex_to_ours(key: str, per_stage_heads: bool) -> Optional[str]:
    """Our name of a detrex Deformable DETR / DINO key, or ``None`` for an alias of a shared tensor
    (``transformer.decoder.{class,bbox}_embed.*``; without ``per_stage_heads`` also the head copies
    ``{class,bbox}_embed.k``, ``k > 0``)."""
    if key.startswith("backbone."):
        return convert_backbone_key(key)
    m = _ENC_LAYER.match(key)
    if m:
        return f"transformer.encoder.layers.{m.group(1)}." + _rename_layer_part(m.group(2), _ENC_TABLE)
    m = _DEC_LAYER.match(key)
    if m:
        return f"transformer.decoder.layers.{m.group(1)}." + _rename_layer_part(m.group(2), _DEC_TABLE)
    if key.startswith("transformer.encoder.post_norm_layer."):
        return "transformer.encoder.norm." + key[len("transformer.encoder.post_norm_layer."):]
    if key.startswith(("transformer.decoder.bbox_embed.", "transformer.decoder.class_embed.")):
        return None
    m = _HEAD.match(key)
    if m and not per_stage_heads:
        return f"{m.group(1)}.0.{m.group(3)}" if m.group(2) == "0" else None
    return key


def deformable_alias_target(key: str, per_stage_heads: bool) -> str:
    """Our key holding the tensor that the dropped detrex alias ``key`` duplicates."""
    if key.startswith("transformer.decoder."):
        key = key[len("transformer.decoder."):]
    m = _HEAD.match(key)
    if m is None:
        raise KeyError(key)
    return key if per_stage_heads else f"{m.group(1)}.0.{m.group(3)}"


def convert_with_aliases(
    state_dict: Mapping[str, Tensor],
    rename: Callable[[str], Optional[str]],
    alias_target: Optional[Callable[[str], str]] = None,
    hint: str = "",
) -> Dict[str, Tensor]:
    """Rename every key of ``state_dict`` with ``rename`` and collapse aliases of one shared tensor.

    ``rename(key)`` gives our key, or ``None`` for a declared alias, whose holder
    ``alias_target(key)`` must be in the checkpoint (``KeyError`` otherwise). Keys renamed onto a key
    already present are aliases too. Every alias must hold the same values as the kept tensor
    (``ValueError`` otherwise, with ``hint`` appended to the message).
    """
    out: Dict[str, Tensor] = {}
    origin: Dict[str, str] = {}
    aliases = []

    def check(key: str, target: str, value: Tensor) -> None:
        kept = out[target]
        if kept.shape != value.shape or not torch.equal(kept, value):
            raise ValueError(
                f"detrex key {key!r} should hold the same tensor as {origin[target]!r} (one shared tensor, "
                f"both map to {target!r}) but its values differ{hint}"
            )

    for key, value in state_dict.items():
        new = rename(key)
        if new is None:
            aliases.append(key)
        elif new in out:
            check(key, new, value)
        else:
            out[new] = value
            origin[new] = key
    for key in aliases:
        target = alias_target(key)
        if target not in out:
            raise KeyError(f"detrex key {key!r} aliases {target!r}, which the checkpoint does not hold")
        check(key, target, state_dict[key])
    return out


# ============================================================================================
# Checkpoint keys, the way back: ours -> detrex (each the inverse of the rule above)
# ============================================================================================


def backbone_key_to_detrex(key: str) -> str:
    """A torchvision-named ResNet key (``backbone.layer1.0.bn1.weight`` ...) in detectron2 names
    (the inverse of :func:`convert_backbone_key`)."""
    return _tv_to_d2(key)


_ENC_LAYER_OURS = re.compile(r"^transformer\.encoder\.layers\.(\d+)\.(.*)$")
_DEC_LAYER_OURS = re.compile(r"^transformer\.decoder\.layers\.(\d+)\.(.*)$")


def _invert(table: Dict[str, str]) -> Dict[str, str]:
    return {new: old for old, new in table.items()}


def _rename_layer_part_back(rest: str, table: Dict[str, str]) -> str:
    for ours, detrex in list(_invert(table).items()) + list(_invert(_FFN).items()):
        if rest.startswith(ours):
            return detrex + rest[len(ours):]
    raise KeyError(rest)


def deformable_ours_to_detrex(key: str) -> str:
    """The detrex name of our Deformable DETR / DINO key (the inverse of
    :func:`deformable_detrex_to_ours` on the keys it keeps)."""
    if key.startswith("backbone."):
        return backbone_key_to_detrex(key)
    m = _ENC_LAYER_OURS.match(key)
    if m:
        return f"transformer.encoder.layers.{m.group(1)}." + _rename_layer_part_back(m.group(2), _ENC_TABLE)
    m = _DEC_LAYER_OURS.match(key)
    if m:
        return f"transformer.decoder.layers.{m.group(1)}." + _rename_layer_part_back(m.group(2), _DEC_TABLE)
    if key.startswith("transformer.encoder.norm."):
        return "transformer.encoder.post_norm_layer." + key[len("transformer.encoder.norm."):]
    return key


def deformable_detrex_names(key: str, per_stage_heads: bool, num_pred: int,
                            decoder_heads: Sequence[str]) -> List[str]:
    """Every detrex key that holds our key's tensor: its detrex name, then the aliases detrex saves
    too -- without ``per_stage_heads`` the shared head ``{class,bbox}_embed.0`` as
    ``{class,bbox}_embed.k`` for ``k < num_pred``; the heads named in ``decoder_heads``
    (``"class_embed"``, ``"bbox_embed"``: those detrex hands to its decoder) again under
    ``transformer.decoder.``."""
    m = _HEAD.match(key)
    if m is None:
        return [deformable_ours_to_detrex(key)]
    head, index, rest = m.groups()
    names = [key] if per_stage_heads else [f"{head}.{k}.{rest}" for k in range(num_pred)]
    if head in decoder_heads:
        names += [f"transformer.decoder.{n}" for n in names]
    return names


def expand_to_detrex(state_dict: Mapping[str, Tensor], names: Callable[[str], Sequence[str]]) -> Dict[str, Tensor]:
    """Our state dict in detrex naming: ``names(key)`` lists the detrex keys holding each tensor
    (its name and its aliases, all pointing at the same tensor, as in a detrex checkpoint). Two of
    our keys landing on one detrex name is an error."""
    out: Dict[str, Tensor] = {}
    for key, value in state_dict.items():
        for name in names(key):
            if name in out:
                raise ValueError(f"our keys {key!r} and another both map to the detrex key {name!r}")
            out[name] = value
    return out
