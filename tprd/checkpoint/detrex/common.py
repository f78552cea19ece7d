"""What the detrex adapters share: the adapter base class, config builders and key helpers.

:class:`DetrexAdapter` is the one interface between a detector of :mod:`tprd.modeling` and the
official detrex world (configs, checkpoints, parity fixtures); each detector has one subclass in
this package, registered in :data:`tprd.checkpoint.detrex.ADAPTERS`.

Config builders take a resolved detrex LazyConfig node (a plain mapping with ``_target_``):
:func:`build_backbone`, :func:`build_neck`, :func:`build_position_embedding`,
:func:`build_matcher` (+ :func:`check_focal_loss`, :func:`layer_kwargs`). Key helpers:
:func:`convert_backbone_key` (detectron2 ResNet names -> torchvision's) and its inverse
:func:`backbone_key_to_detrex`; :func:`convert_with_aliases`, which renames a whole state dict and
collapses detrex's aliases of one shared tensor after checking that they really hold the same
values, and :func:`expand_to_detrex`, the way back (ours -> detrex, with every alias).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Type

import torch
from torch import Tensor, nn

from tprd.layers.position_embedding import PositionEmbeddingSine
from tprd.modeling.backbone import ChannelMapper, ResNet, _tv_to_d2, convert_detectron2_resnet_keys
from tprd.modeling.matcher import HungarianMatcher

__all__ = [
    "DetrexAdapter",
    "config_target",
    "build_backbone",
    "build_neck",
    "build_position_embedding",
    "build_matcher",
    "check_focal_loss",
    "layer_kwargs",
    "DEFORMABLE_LAYER_ARGS",
    "convert_backbone_key",
    "convert_with_aliases",
    "backbone_key_to_detrex",
    "expand_to_detrex",
]


# ============================================================================================
# The adapter interface
# ============================================================================================


class DetrexAdapter:
    """How one detector family meets detrex. A subclass sets :attr:`model_class`, :attr:`name` and
    :attr:`signature` and implements :meth:`build`, :meth:`to_ours` and :meth:`to_detrex`; the rest
    have defaults.

    Attributes:
        model_class: our detector class; its declared ``family`` is the adapter's :attr:`family`,
            the registry key.
        name: the name people use (``"DINO"``); error messages and :meth:`describe` use it.
        detrex_targets: class names of the detrex ``_target_`` this adapter builds from a config,
            compared lower-case without underscores (default: our class's name, e.g.
            ``"DeformableDETR"``, which is detrex's).
        signature: a regular expression (``re.M``, on the newline-joined keys) that only a state
            dict of this family matches, in either naming; :func:`~tprd.checkpoint.detrex.adapter_for_keys`
            tries the adapters in registry order, so a family whose keys are a subset of another's
            comes after it.
    """

    model_class: Type[nn.Module]
    name: str = ""
    signature: str = r"(?!)"
    #: the family's official checkpoints use our key names (nothing to convert, one naming to describe)
    official_naming_is_ours: bool = False

    @property
    def family(self) -> str:
        return self.model_class.family

    @property
    def detrex_targets(self) -> Sequence[str]:
        return (self.model_class.__name__,)

    def build(self, cfg: Mapping[str, Any]) -> nn.Module:
        """Our detector from a resolved detrex LazyConfig dict (a parity fixture's ``reduced_config``)."""
        raise NotImplementedError

    def to_ours(self, state_dict: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        """A detrex-named state dict of this detector in our names; aliases of one shared tensor
        collapse to one key after checking that they hold the same values (``ValueError``)."""
        raise NotImplementedError

    def to_detrex(self, state_dict: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        """Our state dict in detrex naming, with every alias detrex saves (the inverse of :meth:`to_ours`)."""
        raise NotImplementedError

    def read(self, source: Any) -> Dict[str, Tensor]:
        """The flat state dict of a checkpoint file (or loaded dict) of this family: its ``"model"``
        entry by default (:func:`~tprd.checkpoint.state_dict.read_checkpoint`); a family whose
        released files nest the weights otherwise overrides it."""
        from ..state_dict import read_checkpoint

        return read_checkpoint(source)

    def key_map(self, keys: Sequence[str]) -> Optional[Dict[str, str]]:
        """``{detrex key: our key}`` for ``keys`` (aliases map to the key that holds the tensor), or
        ``None`` to let the caller derive it from :meth:`to_ours` with marker tensors."""
        return None

    def parity_intermediates(self, model: nn.Module, outputs: Any) -> Dict[str, Any]:
        """Our tensors of ``model.forward_outputs(...)`` in the layout of a detrex parity fixture's
        ``intermediates.pt`` (default: backbone, neck and masks)."""
        taps = outputs.taps
        return {"backbone": taps.get("backbone"), "neck": taps.get("neck"), "masks": taps.get("neck_masks")}

    def describe(self, joined_keys: str) -> str:
        """The family's name for a state dict whose newline-joined keys match :attr:`signature`
        (a subclass may add the variant, e.g. ``"Deformable DETR (two-stage)"``)."""
        return self.name

    def __repr__(self) -> str:
        return f"<{type(self).__name__} family={self.family!r}>"


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
