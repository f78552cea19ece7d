"""RT-DETR's hybrid encoder: AIFI (attention on the coarsest map) + CCFM (a PAN of CSP-RepVGG blocks).

::

    backbone maps (strides 8/16/32, C_k channels)
      --input_proj[k]: 1x1 conv + BN--> [B,D,H_k,W_k]
      --AIFI on level 2 only: flatten, one post-norm transformer encoder layer with a 2-d sin-cos
        position embedding (q = k = x + pos, v = x), back to [B,D,H_2,W_2]
      --top-down FPN: lateral 1x1 ConvNorm(act) of the coarser map, nearest x2 upsampling,
        CSPRepLayer(concat[upsampled, finer])
      --bottom-up PAN: 3x3 stride-2 ConvNorm(act) of the finer output, CSPRepLayer(concat[down, coarser])
      --> 3 maps [B,D,H_k,W_k] (the "neck" of RT-DETR)

Module names equal the reference's (``input_proj.<k>.conv``, ``encoder.0.layers.0.self_attn``,
``lateral_convs``, ``fpn_blocks``, ``downsample_convs``, ``pan_blocks``).

**Position embedding layout (reference quirk).** :func:`sincos_position_embedding_2d` reproduces
the reference's ``build_2d_sincos_position_embedding(w, h)``: row ``k`` of the embedding uses
``a = k // h`` and ``b = k % h`` while token ``k`` of the raster-flattened ``h x w`` map sits at
``(k // w, k % w)``. On square maps (every official 640x640 setting) this is the token's
``(y, x)``; on non-square maps it is not -- kept as is, because trained weights expect it.
"""
from __future__ import annotations

import copy
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .presnet import ConvNormLayer, get_activation

__all__ = [
    "HybridEncoder",
    "CSPRepLayer",
    "RepVggBlock",
    "TransformerEncoderLayer",
    "sincos_position_embedding_2d",
]


def sincos_position_embedding_2d(w: int, h: int, embed_dim: int = 256, temperature: float = 10000.0) -> Tensor:
    """``[1, w*h, embed_dim]`` fixed sin-cos embedding, in the reference's layout (module docstring):
    ``[sin(a w), cos(a w), sin(b w), cos(b w)]`` with ``w_i = temperature^(-i / (D/4))``,
    ``a = k // h``, ``b = k % h``."""
    if embed_dim % 4:
        raise ValueError(f"the 2-d sin-cos position embedding needs embed_dim % 4 == 0, got {embed_dim}")
    grid_a, grid_b = torch.meshgrid(torch.arange(int(w), dtype=torch.float32),
                                    torch.arange(int(h), dtype=torch.float32), indexing="ij")
    quarter = embed_dim // 4
    omega = 1.0 / (temperature ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    out_a = grid_a.flatten()[:, None] @ omega[None]
    out_b = grid_b.flatten()[:, None] @ omega[None]
    return torch.cat([out_a.sin(), out_a.cos(), out_b.sin(), out_b.cos()], dim=1)[None]


class RepVggBlock(nn.Module):
    """``act(BN(conv3x3(x)) + BN(conv1x1(x)))`` (training form of a RepVGG block)."""

    def __init__(self, ch_in: int, ch_out: int, act: Optional[str] = "relu"):
        super().__init__()
        self.conv1 = ConvNormLayer(ch_in, ch_out, 3, 1, padding=1, act=None)
        self.conv2 = ConvNormLayer(ch_in, ch_out, 1, 1, padding=0, act=None)
        self.act = get_activation(act)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.conv1(x) + self.conv2(x))


class CSPRepLayer(nn.Module):
    """``conv3(bottlenecks(conv1(x)) + conv2(x))``; conv1/conv2 are 1x1 ConvNorm(act) to the hidden
    width ``expansion * out_channels``, the bottlenecks ``num_blocks`` :class:`RepVggBlock` s, conv3 a
    1x1 ConvNorm(act) back to ``out_channels`` (identity when the widths agree)."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int = 3, expansion: float = 1.0,
                 bias: bool = False, act: str = "silu"):
        super().__init__()
        hidden = int(out_channels * expansion)
        self.conv1 = ConvNormLayer(in_channels, hidden, 1, 1, bias=bias, act=act)
        self.conv2 = ConvNormLayer(in_channels, hidden, 1, 1, bias=bias, act=act)
        self.bottlenecks = nn.Sequential(*[RepVggBlock(hidden, hidden, act=act) for _ in range(num_blocks)])
        self.conv3 = (ConvNormLayer(hidden, out_channels, 1, 1, bias=bias, act=act)
                      if hidden != out_channels else nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        return self.conv3(self.bottlenecks(self.conv1(x)) + self.conv2(x))


class TransformerEncoderLayer(nn.Module):
    """Post-norm (default) transformer encoder layer: self-attention with ``q = k = x + pos``,
    ``v = x``; add & norm1; FFN (``activation``); add & norm2."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: str = "relu", normalize_before: bool = False):
        super().__init__()
        self.normalize_before = normalize_before
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = get_activation(activation)

    def forward(self, src: Tensor, src_mask: Optional[Tensor] = None, pos_embed: Optional[Tensor] = None) -> Tensor:
        residual = src
        if self.normalize_before:
            src = self.norm1(src)
        q = k = src if pos_embed is None else src + pos_embed
        src, _ = self.self_attn(q, k, value=src, attn_mask=src_mask)
        src = residual + self.dropout1(src)
        if not self.normalize_before:
            src = self.norm1(src)
        residual = src
        if self.normalize_before:
            src = self.norm2(src)
        src = self.linear2(self.dropout(self.activation(self.linear1(src))))
        src = residual + self.dropout2(src)
        if not self.normalize_before:
            src = self.norm2(src)
        return src


class TransformerEncoder(nn.Module):
    """``num_layers`` copies of one encoder layer (optional final norm)."""

    def __init__(self, encoder_layer: nn.Module, num_layers: int, norm: Optional[nn.Module] = None):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(encoder_layer) for _ in range(num_layers))
        self.num_layers = num_layers
        self.norm = norm

    def forward(self, src: Tensor, src_mask: Optional[Tensor] = None, pos_embed: Optional[Tensor] = None) -> Tensor:
        for layer in self.layers:
            src = layer(src, src_mask=src_mask, pos_embed=pos_embed)
        return src if self.norm is None else self.norm(src)


class HybridEncoder(nn.Module):
    """AIFI + CCFM with the reference's constructor arguments (``HybridEncoder`` of RT-DETRv2).

    Args:
        in_channels: backbone widths per level (R18/R34: 128/256/512; R50/R101: 512/1024/2048).
        feat_strides: strides of those levels (8/16/32).
        hidden_dim: width ``D`` of every output map (256; 384 for R101).
        nhead, dim_feedforward, dropout, enc_act: the AIFI transformer layer.
        use_encoder_idx: levels that get AIFI (``[2]``, the coarsest).
        num_encoder_layers: AIFI layers per such level (1).
        pe_temperature: temperature of the sin-cos position embedding.
        expansion: hidden width factor of the CSP blocks (0.5 for R18/R34/R50-m, 1.0 for R50/R101).
        depth_mult: RepVGG blocks per CSP block = ``round(3 * depth_mult)``.
        act: activation of the FPN/PAN convs (``"silu"``).
        eval_spatial_size: ``[H, W]`` input size whose position embedding is cached (non-persistent
            buffer ``pos_embed<idx>``); other sizes compute it on the fly.
        version: ``"v2"`` (``input_proj.<k>.conv/.norm``) or ``"v1"`` (``input_proj.<k>.0/.1``).

    ``forward(feats)`` returns the list of ``len(in_channels)`` maps ``[B,D,H_k,W_k]``; with
    ``return_aifi=True`` also ``{"aifi_input" [B,h*w,D], "aifi_pos_embed" [1,h*w,D], "aifi_output"}``
    of the (last) AIFI level. Input sizes must be multiples of the largest stride (32).
    """

    def __init__(self, in_channels: Sequence[int] = (512, 1024, 2048), feat_strides: Sequence[int] = (8, 16, 32),
                 hidden_dim: int = 256, nhead: int = 8, dim_feedforward: int = 1024, dropout: float = 0.0,
                 enc_act: str = "gelu", use_encoder_idx: Sequence[int] = (2,), num_encoder_layers: int = 1,
                 pe_temperature: float = 10000, expansion: float = 1.0, depth_mult: float = 1.0, act: str = "silu",
                 eval_spatial_size: Optional[Sequence[int]] = None, version: str = "v2"):
        super().__init__()
        self.in_channels = list(in_channels)
        self.feat_strides = list(feat_strides)
        self.hidden_dim = hidden_dim
        self.use_encoder_idx = list(use_encoder_idx)
        self.num_encoder_layers = num_encoder_layers
        self.pe_temperature = pe_temperature
        self.eval_spatial_size = list(eval_spatial_size) if eval_spatial_size else None
        self.out_channels = [hidden_dim] * len(self.in_channels)
        self.out_strides = self.feat_strides

        if version not in ("v1", "v2"):
            raise ValueError(f"HybridEncoder version must be 'v1' or 'v2', got {version!r}")
        self.input_proj = nn.ModuleList()
        for ch in self.in_channels:
            conv, norm = nn.Conv2d(ch, hidden_dim, kernel_size=1, bias=False), nn.BatchNorm2d(hidden_dim)
            proj = nn.Sequential()
            proj.add_module("conv" if version == "v2" else "0", conv)
            proj.add_module("norm" if version == "v2" else "1", norm)
            self.input_proj.append(proj)

        layer = TransformerEncoderLayer(hidden_dim, nhead=nhead, dim_feedforward=dim_feedforward, dropout=dropout,
                                        activation=enc_act)
        self.encoder = nn.ModuleList(
            TransformerEncoder(copy.deepcopy(layer), num_encoder_layers) for _ in range(len(self.use_encoder_idx)))

        n = len(self.in_channels)
        blocks = round(3 * depth_mult)
        self.lateral_convs = nn.ModuleList(ConvNormLayer(hidden_dim, hidden_dim, 1, 1, act=act) for _ in range(n - 1))
        self.fpn_blocks = nn.ModuleList(
            CSPRepLayer(hidden_dim * 2, hidden_dim, blocks, act=act, expansion=expansion) for _ in range(n - 1))
        self.downsample_convs = nn.ModuleList(
            ConvNormLayer(hidden_dim, hidden_dim, 3, 2, act=act) for _ in range(n - 1))
        self.pan_blocks = nn.ModuleList(
            CSPRepLayer(hidden_dim * 2, hidden_dim, blocks, act=act, expansion=expansion) for _ in range(n - 1))

        if self.eval_spatial_size:
            eh, ew = self.eval_spatial_size
            for idx in self.use_encoder_idx:
                s = self.feat_strides[idx]
                pos = sincos_position_embedding_2d(ew // s, eh // s, hidden_dim, pe_temperature)
                self.register_buffer(f"pos_embed{idx}", pos, persistent=False)

    def position_embedding(self, idx: int, h: int, w: int, device) -> Tensor:
        """The AIFI position embedding of level ``idx`` for an ``h x w`` map: the cached one when
        it has that size (the reference uses it in eval), else computed (bitwise equal)."""
        cached = getattr(self, f"pos_embed{idx}", None)
        if cached is not None and not self.training and cached.shape[1] == h * w:
            s = self.feat_strides[idx]
            if [h * s, w * s] == self.eval_spatial_size:
                return cached
        return sincos_position_embedding_2d(w, h, self.hidden_dim, self.pe_temperature).to(device)

    def forward(self, feats: Sequence[Tensor], return_aifi: bool = False):
        if len(feats) != len(self.in_channels):
            raise ValueError(f"HybridEncoder expects {len(self.in_channels)} maps, got {len(feats)}")
        proj = [self.input_proj[i](f) for i, f in enumerate(feats)]
        aifi = {}
        if self.num_encoder_layers > 0:
            for i, idx in enumerate(self.use_encoder_idx):
                h, w = proj[idx].shape[2:]
                src = proj[idx].flatten(2).permute(0, 2, 1)
                pos = self.position_embedding(idx, h, w, src.device).to(src.dtype)
                memory = self.encoder[i](src, pos_embed=pos)
                proj[idx] = memory.permute(0, 2, 1).reshape(-1, self.hidden_dim, h, w).contiguous()
                if return_aifi:
                    aifi = {"aifi_input": src, "aifi_pos_embed": pos, "aifi_output": memory}

        n = len(self.in_channels)
        # top-down: inner[0] is always the coarsest map processed so far
        inner = [proj[-1]]
        for idx in range(n - 1, 0, -1):
            j = n - 1 - idx
            high = self.lateral_convs[j](inner[0])
            inner[0] = high
            if high.shape[-2] * 2 != proj[idx - 1].shape[-2] or high.shape[-1] * 2 != proj[idx - 1].shape[-1]:
                raise ValueError(
                    f"HybridEncoder: level {idx} is {tuple(high.shape[-2:])} and level {idx - 1} is "
                    f"{tuple(proj[idx - 1].shape[-2:])}; the input height and width must be multiples of "
                    f"{self.feat_strides[-1]}")
            up = F.interpolate(high, scale_factor=2.0, mode="nearest")
            inner.insert(0, self.fpn_blocks[j](torch.cat([up, proj[idx - 1]], dim=1)))
        # bottom-up
        outs = [inner[0]]
        for idx in range(n - 1):
            down = self.downsample_convs[idx](outs[-1])
            outs.append(self.pan_blocks[idx](torch.cat([down, inner[idx + 1]], dim=1)))
        return (outs, aifi) if return_aifi else outs
