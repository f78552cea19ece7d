"""PResNet-vd: the ResNet variant RT-DETR uses as its backbone (docs/rt_detr.md).

The "vd" ResNet (Bag of Tricks, He et al. 2019), as RT-DETRv2's ``PResNet``:

* stem: three 3x3 conv + BN + act (3 -> 32 stride 2, 32 -> 32, 32 -> 64), then ``max_pool(3, 2, 1)``;
* stages ``res2 .. res5`` of :class:`BasicBlock` (depth 18/34) or :class:`BottleNeck` (50/101);
  the first block of a stage changes the width (and, except in ``res2``, the resolution);
* variant ``d``: a stride-2 shortcut is ``AvgPool2d(2, 2, ceil_mode=True)`` followed by a 1x1
  conv + BN, so no activation is dropped by a strided 1x1 conv; bottlenecks put the stride on the
  3x3 conv (variant ``b`` and ``d``; ``a`` puts it on the first 1x1).

Module names equal the reference's (``conv1.conv1_1.conv``, ``res_layers.<i>.blocks.<j>.branch2a``,
``short.conv`` ...), so official state dicts load without renaming.

Norm options: ``freeze_norm=True`` replaces every ``BatchNorm2d`` by :class:`FrozenBatchNorm2d`
(statistics and affine parameters are buffers), ``freeze_at >= 0`` stops gradients to the stem and
to the first ``freeze_at`` stages (``0``: the stem only).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "PResNet",
    "FrozenBatchNorm2d",
    "ConvNormLayer",
    "BasicBlock",
    "BottleNeck",
    "freeze_batch_norm",
    "get_activation",
    "RESNET_DEPTHS",
]

# blocks per stage
RESNET_DEPTHS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


def get_activation(act: Optional[str]) -> nn.Module:
    """``None`` -> identity; ``"relu"``, ``"silu"`` (``"swish"``), ``"gelu"``, ``"leaky_relu"``,
    ``"hardsigmoid"`` -> the torch module."""
    if act is None:
        return nn.Identity()
    if isinstance(act, nn.Module):
        return act
    table = {
        "relu": nn.ReLU,
        "silu": nn.SiLU,
        "swish": nn.SiLU,
        "gelu": nn.GELU,
        "leaky_relu": nn.LeakyReLU,
        "hardsigmoid": nn.Hardsigmoid,
    }
    key = str(act).lower()
    if key not in table:
        raise ValueError(f"unknown activation {act!r}; known: {sorted(table)}")
    return table[key]()


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed statistics and affine parameters, all four stored as buffers.

    ``y = x * scale + shift`` with ``scale = weight / sqrt(running_var + eps)`` and
    ``shift = bias - running_mean * scale`` (RT-DETR's formula; eps 1e-5). A state dict's
    ``num_batches_tracked`` entry (from a plain ``BatchNorm2d``) is dropped on loading.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight.reshape(1, -1, 1, 1) * (self.running_var.reshape(1, -1, 1, 1) + self.eps).rsqrt()
        shift = self.bias.reshape(1, -1, 1, 1) - self.running_mean.reshape(1, -1, 1, 1) * scale
        return x * scale + shift

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def freeze_batch_norm(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` inside ``module`` (or ``module`` itself) by a
    :class:`FrozenBatchNorm2d` holding its current statistics and affine parameters."""
    if isinstance(module, nn.BatchNorm2d):
        frozen = FrozenBatchNorm2d(module.num_features, module.eps)
        with torch.no_grad():
            if module.affine:
                frozen.weight.copy_(module.weight)
                frozen.bias.copy_(module.bias)
            if module.track_running_stats:
                frozen.running_mean.copy_(module.running_mean)
                frozen.running_var.copy_(module.running_var)
        return frozen
    for name, child in module.named_children():
        new = freeze_batch_norm(child)
        if new is not child:
            setattr(module, name, new)
    return module


class ConvNormLayer(nn.Module):
    """``act(norm(conv(x)))``: a conv (padding ``(k-1)//2``, no bias by default), ``BatchNorm2d`` and
    an optional activation."""

    def __init__(self, ch_in: int, ch_out: int, kernel_size: int, stride: int, padding: Optional[int] = None,
                 bias: bool = False, act: Optional[str] = None):
        super().__init__()
        pad = (kernel_size - 1) // 2 if padding is None else padding
        self.conv = nn.Conv2d(ch_in, ch_out, kernel_size, stride, padding=pad, bias=bias)
        self.norm = nn.BatchNorm2d(ch_out)
        self.act = get_activation(act)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.norm(self.conv(x)))


def _shortcut(ch_in: int, ch_out: int, stride: int, variant: str) -> nn.Module:
    """Projection shortcut; variant ``d`` downsamples with an average pool before the 1x1 conv."""
    if variant == "d" and stride == 2:
        return _named_sequential(pool=nn.AvgPool2d(2, 2, 0, ceil_mode=True), conv=ConvNormLayer(ch_in, ch_out, 1, 1))
    return ConvNormLayer(ch_in, ch_out, 1, stride)


def _named_sequential(**modules: nn.Module) -> nn.Sequential:
    seq = nn.Sequential()
    for name, m in modules.items():
        seq.add_module(name, m)
    return seq


class BasicBlock(nn.Module):
    """Two 3x3 convs + shortcut (identity when ``shortcut``, else a projection), then ``act``."""

    expansion = 1

    def __init__(self, ch_in: int, ch_out: int, stride: int, shortcut: bool, act: str = "relu", variant: str = "d"):
        super().__init__()
        self.shortcut = shortcut
        if not shortcut:
            self.short = _shortcut(ch_in, ch_out, stride, variant)
        self.branch2a = ConvNormLayer(ch_in, ch_out, 3, stride, act=act)
        self.branch2b = ConvNormLayer(ch_out, ch_out, 3, 1, act=None)
        self.act = get_activation(act)

    def forward(self, x: Tensor) -> Tensor:
        out = self.branch2b(self.branch2a(x))
        return self.act(out + (x if self.shortcut else self.short(x)))


class BottleNeck(nn.Module):
    """1x1 -> 3x3 -> 1x1 (x4 width) + shortcut, then ``act``; the stride sits on the 3x3 conv
    (on the first 1x1 in variant ``a``)."""

    expansion = 4

    def __init__(self, ch_in: int, ch_out: int, stride: int, shortcut: bool, act: str = "relu", variant: str = "d"):
        super().__init__()
        stride1, stride2 = (stride, 1) if variant == "a" else (1, stride)
        self.branch2a = ConvNormLayer(ch_in, ch_out, 1, stride1, act=act)
        self.branch2b = ConvNormLayer(ch_out, ch_out, 3, stride2, act=act)
        self.branch2c = ConvNormLayer(ch_out, ch_out * self.expansion, 1, 1)
        self.shortcut = shortcut
        if not shortcut:
            self.short = _shortcut(ch_in, ch_out * self.expansion, stride, variant)
        self.act = get_activation(act)

    def forward(self, x: Tensor) -> Tensor:
        out = self.branch2c(self.branch2b(self.branch2a(x)))
        return self.act(out + (x if self.shortcut else self.short(x)))


class Blocks(nn.Module):
    """One stage: ``count`` blocks; the first projects (and, from ``res3`` on, halves the size)."""

    def __init__(self, block, ch_in: int, ch_out: int, count: int, stage_num: int, act: str = "relu",
                 variant: str = "d"):
        super().__init__()
        self.blocks = nn.ModuleList()
        for i in range(count):
            stride = 2 if i == 0 and stage_num != 2 else 1
            self.blocks.append(block(ch_in, ch_out, stride=stride, shortcut=i != 0, act=act, variant=variant))
            if i == 0:
                ch_in = ch_out * block.expansion

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class PResNet(nn.Module):
    """PResNet-vd returning the maps of the stages in ``return_idx`` (0 = ``res2`` ... 3 = ``res5``).

    Args:
        depth: 18, 34, 50 or 101.
        variant: ``"d"`` (RT-DETR), ``"c"`` (deep stem only), ``"b"`` / ``"a"`` (7x7 stem).
        num_stages: stages built (4).
        return_idx: stages returned, e.g. ``[1, 2, 3]`` -> ``res3, res4, res5`` (strides 8/16/32).
        act: activation of the stem and the blocks.
        freeze_at: ``-1`` trains everything; ``k >= 0`` freezes the stem and the first ``k`` stages.
        freeze_norm: every BatchNorm becomes :class:`FrozenBatchNorm2d` (R50/R101 official configs).
        pretrained: accepted for config compatibility; must be false (load weights with
            :func:`tprd.checkpoint.load_rtdetr_checkpoint` or ``train.init_checkpoint``).

    ``forward(x [B,3,H,W])`` returns a list of ``[B, C_k, H/s_k, W/s_k]``; :attr:`out_channels`,
    :attr:`out_strides` and :attr:`out_names` describe them.
    """

    def __init__(self, depth: int = 50, variant: str = "d", num_stages: int = 4,
                 return_idx: Sequence[int] = (0, 1, 2, 3), act: str = "relu", freeze_at: int = -1,
                 freeze_norm: bool = True, pretrained: bool = False):
        super().__init__()
        if depth not in RESNET_DEPTHS:
            raise ValueError(f"PResNet depth must be one of {sorted(RESNET_DEPTHS)}, got {depth}")
        if pretrained:
            raise ValueError(
                "PResNet(pretrained=True) would download ImageNet weights; this toolbox never downloads. "
                "Set pretrained=False and load the weights with train.init_checkpoint or "
                "tprd.checkpoint.load_rtdetr_checkpoint"
            )
        self.depth = depth
        ch_in = 64
        if variant in ("c", "d"):
            stem = [(3, ch_in // 2, 3, 2, "conv1_1"), (ch_in // 2, ch_in // 2, 3, 1, "conv1_2"),
                    (ch_in // 2, ch_in, 3, 1, "conv1_3")]
        else:
            stem = [(3, ch_in, 7, 2, "conv1_1")]
        self.conv1 = _named_sequential(**{name: ConvNormLayer(ci, co, k, s, act=act) for ci, co, k, s, name in stem})

        widths = [64, 128, 256, 512]
        block = BottleNeck if depth >= 50 else BasicBlock
        channels = [block.expansion * w for w in widths]
        strides = [4, 8, 16, 32]
        self.res_layers = nn.ModuleList()
        for i in range(num_stages):
            self.res_layers.append(Blocks(block, ch_in, widths[i], RESNET_DEPTHS[depth][i], i + 2, act, variant))
            ch_in = channels[i]
        self.return_idx = list(return_idx)
        self.out_channels = [channels[i] for i in self.return_idx]
        self.out_strides = [strides[i] for i in self.return_idx]
        self.out_names = [f"res{i + 2}" for i in self.return_idx]

        self.freeze_at = freeze_at
        if freeze_at >= 0:
            for p in self.conv1.parameters():
                p.requires_grad_(False)
            for i in range(min(freeze_at, num_stages)):
                for p in self.res_layers[i].parameters():
                    p.requires_grad_(False)
        self.freeze_norm = freeze_norm
        if freeze_norm:
            freeze_batch_norm(self)

    def forward(self, x: Tensor) -> List[Tensor]:
        x = F.max_pool2d(self.conv1(x), kernel_size=3, stride=2, padding=1)
        outs = []
        for idx, stage in enumerate(self.res_layers):
            x = stage(x)
            if idx in self.return_idx:
                outs.append(x)
        return outs

    def named_outputs(self, x: Tensor) -> Dict[str, Tensor]:
        """``{"res3": ..., "res4": ..., "res5": ...}`` (the names of :attr:`out_names`)."""
        return dict(zip(self.out_names, self.forward(x)))
