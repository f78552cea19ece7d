"""ResNet backbone (torchvision, frozen batch norm, multi-scale outputs) and the ChannelMapper neck.

The backbone keeps torchvision's module names (``conv1``, ``bn1``, ``layer1`` .. ``layer4``) so an
ImageNet checkpoint from torchvision loads as it is; :func:`convert_detectron2_resnet_keys` maps
the detectron2/detrex naming of official detrex checkpoints onto it. Stage names follow
detectron2: ``res2`` .. ``res5`` are ``layer1`` .. ``layer4`` (strides 4, 8, 16, 32).
"""
from __future__ import annotations

import re
from typing import Dict, List, Mapping, Sequence

from torch import Tensor, nn
from torchvision.models import resnet
from torchvision.ops import FrozenBatchNorm2d

__all__ = [
    "ResNet",
    "ChannelMapper",
    "convert_detectron2_resnet_keys",
    "convert_torchvision_resnet_keys",
    "torchvision_to_detectron2_resnet_keys",
]

_RESNETS = {18: resnet.resnet18, 34: resnet.resnet34, 50: resnet.resnet50, 101: resnet.resnet101}
_STAGES = ("res2", "res3", "res4", "res5")
_STRIDES = {"stem": 4, "res2": 4, "res3": 8, "res4": 16, "res5": 32}


class ResNet(nn.Module):
    """torchvision ResNet-``depth`` returning the feature maps named in ``out_features``.

    ``freeze_at``: 0 trains everything, 1 freezes the stem, k>1 also freezes ``res2`` ..
    ``res{k}`` (detectron2 semantics). ``norm="FrozenBN"`` (default) uses frozen batch norm with
    eps 1e-5 everywhere, like detectron2; ``"BN"`` uses trainable batch norm.
    """

    def __init__(
        self,
        depth: int = 50,
        out_features: Sequence[str] = ("res3", "res4", "res5"),
        freeze_at: int = 1,
        norm: str = "FrozenBN",
    ):
        super().__init__()
        if depth not in _RESNETS:
            raise ValueError(f"ResNet depth must be one of {sorted(_RESNETS)}, got {depth}")
        unknown = [f for f in out_features if f not in _STAGES]
        if unknown:
            raise ValueError(f"unknown ResNet out_features {unknown}; choose from {_STAGES}")
        if norm not in ("FrozenBN", "BN"):
            raise ValueError(f"norm must be 'FrozenBN' or 'BN', got {norm!r}")
        net = _RESNETS[depth](weights=None, norm_layer=FrozenBatchNorm2d if norm == "FrozenBN" else nn.BatchNorm2d)
        self.depth = depth
        self.out_features = list(out_features)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        widths = [64, 128, 256, 512] if depth < 50 else [256, 512, 1024, 2048]
        self.out_channels: Dict[str, int] = dict(zip(_STAGES, widths))
        self.out_strides: Dict[str, int] = {k: _STRIDES[k] for k in _STAGES}
        self.freeze(freeze_at)

    def freeze(self, freeze_at: int) -> None:
        frozen = [self.conv1, self.bn1] if freeze_at >= 1 else []
        frozen += [self.layer1, self.layer2, self.layer3, self.layer4][: max(freeze_at - 1, 0)]
        for module in frozen:
            for p in module.parameters():
                p.requires_grad_(False)

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        """``x [B,3,H,W]`` -> ``{name: [B, C_name, H/stride, W/stride]}`` for ``out_features``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outputs = {}
        last = max(_STAGES.index(f) for f in self.out_features)
        for name, layer in zip(_STAGES[: last + 1], (self.layer1, self.layer2, self.layer3, self.layer4)):
            x = layer(x)
            if name in self.out_features:
                outputs[name] = x
        return outputs


def convert_detectron2_resnet_keys(state_dict: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """Rename detectron2/detrex ResNet keys (``stem.conv1``, ``res2.0.conv1.norm`` ...) to torchvision's.

    Works on any prefix (``backbone.``, ``teacher.backbone.`` ...): only the part from ``stem.`` or
    ``resN.`` on is rewritten. Keys that are not detectron2 ResNet keys pass through unchanged.
    """
    out: Dict[str, Tensor] = {}
    for key, value in state_dict.items():
        out[_d2_to_tv(key)] = value
    return out


_D2_STEM = re.compile(r"(^|\.)stem\.conv1\.(norm\.)?")
_D2_BLOCK = re.compile(r"(^|\.)res([2-5])\.(\d+)\.(conv[1-3]|shortcut)\.(norm\.)?")


def _d2_to_tv(key: str) -> str:
    m = _D2_STEM.search(key)
    if m:
        new = m.group(1) + ("bn1." if m.group(2) else "conv1.")
        return key[: m.start()] + new + key[m.end():]
    m = _D2_BLOCK.search(key)
    if m:
        lead, stage, block, conv, norm = m.groups()
        layer = f"layer{int(stage) - 1}.{block}."
        if conv == "shortcut":
            part = "downsample.1." if norm else "downsample.0."
        else:
            part = f"bn{conv[-1]}." if norm else f"{conv}."
        return key[: m.start()] + lead + layer + part + key[m.end():]
    return key


def convert_torchvision_resnet_keys(state_dict: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """Drop the classifier (``fc.*``) and ``num_batches_tracked`` from a torchvision ResNet state dict."""
    return {
        k: v
        for k, v in state_dict.items()
        if not k.startswith("fc.") and not k.endswith("num_batches_tracked")
    }


_TV_STEM = re.compile(r"(^|(?<![0-9])\.)(conv1|bn1)\.")  # not a block's conv1 ("layer1.0.conv1")
_TV_BLOCK = re.compile(r"(^|\.)layer([1-4])\.(\d+)\.(conv[1-3]|bn[1-3]|downsample\.[01])\.")


def _tv_to_d2(key: str) -> str:
    if _D2_STEM.search(key) or _D2_BLOCK.search(key):
        return key  # already detectron2 naming
    m = _TV_BLOCK.search(key)
    if m:
        lead, layer, block, part = m.groups()
        if part.startswith("downsample"):
            new = "shortcut." if part.endswith("0") else "shortcut.norm."
        elif part.startswith("bn"):
            new = f"conv{part[-1]}.norm."
        else:
            new = f"{part}."
        return key[: m.start()] + f"{lead}res{int(layer) + 1}.{block}." + new + key[m.end():]
    m = _TV_STEM.search(key)
    if m:
        new = "stem.conv1." if m.group(2) == "conv1" else "stem.conv1.norm."
        return key[: m.start()] + m.group(1) + new + key[m.end():]
    return key


def torchvision_to_detectron2_resnet_keys(state_dict: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """Rename torchvision ResNet keys to detectron2's naming (the inverse of
    :func:`convert_detectron2_resnet_keys`); ``fc.*`` and ``num_batches_tracked`` are dropped."""
    return {_tv_to_d2(k): v for k, v in convert_torchvision_resnet_keys(state_dict).items()}


class ChannelMapper(nn.Module):
    """Project backbone maps to a common width (conv + GroupNorm each), plus extra stride-2 levels.

    ``in_channels``: channels of the inputs in order (e.g. res3, res4, res5). Each input gets a
    ``kernel_size`` conv (bias) + GroupNorm; when ``num_outs`` exceeds the inputs, the first extra
    level is a 3x3 stride-2 conv + GroupNorm on the raw last input, later ones on the previous
    output. Module names follow detrex (``convs.i.conv``, ``convs.i.norm``, ``extra_convs.j.*``).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        out_channels: int = 256,
        num_outs: int = 4,
        kernel_size: int = 1,
        num_groups: int = 32,
        in_features: Sequence[str] = ("res3", "res4", "res5"),
    ):
        super().__init__()
        if num_outs < len(in_channels):
            raise ValueError(f"num_outs ({num_outs}) must be >= number of inputs ({len(in_channels)})")
        if len(in_features) != len(in_channels):
            raise ValueError("in_features and in_channels must have the same length")
        self.in_features = list(in_features)
        self.convs = nn.ModuleList(
            _ConvNorm(c, out_channels, kernel_size, 1, (kernel_size - 1) // 2, num_groups) for c in in_channels
        )
        extra_in = [in_channels[-1]] + [out_channels] * (num_outs - len(in_channels) - 1)
        self.extra_convs = nn.ModuleList(
            _ConvNorm(c, out_channels, 3, 2, 1, num_groups) for c in extra_in[: num_outs - len(in_channels)]
        )

    def forward(self, features: Mapping[str, Tensor]) -> List[Tensor]:
        inputs = [features[f] for f in self.in_features]
        outs = [conv(x) for conv, x in zip(self.convs, inputs)]
        for i, conv in enumerate(self.extra_convs):
            outs.append(conv(inputs[-1] if i == 0 else outs[-1]))
        return outs


class _ConvNorm(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int, padding: int, num_groups: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, bias=True)
        self.norm = nn.GroupNorm(num_groups, cout)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv(x))
