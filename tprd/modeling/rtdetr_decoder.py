"""RT-DETRv2's decoder side: input projection, anchors, query selection, contrastive denoising and
the deformable decoder with per-level sampling points (docs/rt_detr.md).

::

    neck maps [B,D,H_l,W_l] --input_proj[l]: 1x1 conv + BN--> flatten (raster order), concat
      --> memory [B,S,D]
    anchors [1,S,4] (cell centres, size 0.05 * 2^l, logit space; +inf within eps of the border)
    output_memory = LayerNorm(Linear(valid_mask * memory))
      --enc_score_head--> logits [B,S,C];  --enc_bbox_head + anchors--> coords (un-sigmoided)
      --top-Q tokens by max class logit--> content = output_memory (detached), reference = coords (detached)
    (training) denoising queries first: [dn | matching queries], behind an attention mask
    decoder layer (post-norm): self-attn (q = k = x + pos, v = x; pos = MLP(ref)), add & norm1,
      deformable cross-attn (per-level points, 2 * loc - 1 into grid_sample), add & norm2,
      FFN, add & norm3; box_i = sigmoid(dec_bbox_head[i](x_i) + inverse_sigmoid(ref_i)),
      ref_{i+1} = box_i.detach(); logits_i = dec_score_head[i](x_i)

Module and buffer names equal the reference's (``input_proj``, ``decoder.layers.<i>.cross_attn``,
``query_pos_head``, ``enc_output.proj/.norm``, ``enc_score_head``, ``enc_bbox_head``,
``dec_score_head``, ``dec_bbox_head``, ``denoising_class_embed``, ``anchors``, ``valid_mask``), so
an official ``decoder.*`` state dict loads 1:1.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn import init

from ..layers.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh
from ..layers.box_ops import inverse_sigmoid as _inverse_sigmoid
from ..layers.mlp import MLP
from .detector import multihead_attention_weights
from .presnet import get_activation

__all__ = [
    "RTDETRTransformerv2",
    "TransformerDecoder",
    "TransformerDecoderLayer",
    "MSDeformableAttentionV2",
    "deformable_attention_v2",
    "generate_anchors",
    "contrastive_denoising_group",
    "inverse_sigmoid",
]

INVERSE_SIGMOID_EPS = 1e-5  # RT-DETR's clamp in inverse_sigmoid (DINO/detrex: 1e-3)


def inverse_sigmoid(x: Tensor) -> Tensor:
    """``log(x / (1 - x))`` with ``x`` clipped to [0, 1] and both terms clamped at 1e-5 (RT-DETR)."""
    return _inverse_sigmoid(x, eps=INVERSE_SIGMOID_EPS)


def _prior_bias(prior_prob: float = 0.01) -> float:
    return float(-math.log((1 - prior_prob) / prior_prob))


# ============================================================================================
# Deformable attention with per-level point counts
# ============================================================================================


def deformable_attention_v2(value: Tensor, spatial_shapes: Sequence[Tuple[int, int]], sampling_locations: Tensor,
                            attention_weights: Tensor, num_points_list: Sequence[int],
                            method: str = "default") -> Tensor:
    """Sample and weight the values (RT-DETRv2's pure-PyTorch core).

    ``value [B,S,M,Dh]``; ``sampling_locations [B,Q,M,sum(P_l),2]`` normalised (x, y), the points of
    level 0 first; ``attention_weights [B,Q,M,sum(P_l)]``. ``method="default"``: bilinear
    ``grid_sample`` (zero padding, ``align_corners=False``) at ``2 * loc - 1``; ``"discrete"``: the
    value of the cell ``floor(loc * (w, h) + 0.5)``, clamped into the map (the reference clamps both
    coordinates at ``h - 1``, which differs only on non-square maps). Returns ``[B,Q,M*Dh]``.
    """
    bsz, _, heads, dh = value.shape
    nq = sampling_locations.shape[1]
    sizes = [int(h) * int(w) for h, w in spatial_shapes]
    values = value.permute(0, 2, 3, 1).flatten(0, 1).split(sizes, dim=-1)
    grids = 2 * sampling_locations - 1 if method == "default" else sampling_locations
    grids = grids.permute(0, 2, 1, 3, 4).flatten(0, 1).split(list(num_points_list), dim=-2)
    sampled = []
    for level, (h, w) in enumerate(spatial_shapes):
        h, w = int(h), int(w)
        value_l = values[level].reshape(bsz * heads, dh, h, w)
        grid_l = grids[level]
        if method == "default":
            sampled.append(F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False))
        elif method == "discrete":
            coord = (grid_l * torch.tensor([[w, h]], device=value.device) + 0.5).to(torch.int64)
            x = coord[..., 0].clamp(0, w - 1).reshape(bsz * heads, -1)
            y = coord[..., 1].clamp(0, h - 1).reshape(bsz * heads, -1)
            rows = torch.arange(bsz * heads, device=value.device)[:, None].expand_as(x)
            picked = value_l[rows, :, y, x]  # [B*M, Q*P, Dh]
            sampled.append(picked.permute(0, 2, 1).reshape(bsz * heads, dh, nq, num_points_list[level]))
        else:
            raise ValueError(f"deformable attention method must be 'default' or 'discrete', got {method!r}")
    weights = attention_weights.permute(0, 2, 1, 3).reshape(bsz * heads, 1, nq, sum(num_points_list))
    out = (torch.cat(sampled, dim=-1) * weights).sum(-1).reshape(bsz, heads * dh, nq)
    return out.permute(0, 2, 1)


class MSDeformableAttentionV2(nn.Module):
    """Multi-scale deformable attention of RT-DETRv2: ``num_points[l]`` points per head on level
    ``l``, one softmax over all points of a head (all levels together), offsets scaled by the
    reference box size: ``loc = ref_xy + offset / P_l * ref_wh * offset_scale``.

    ``num_points_scale`` (buffer ``[sum P_l]``, ``1 / P_l`` per point) is in official checkpoints.
    ``method="discrete"`` samples the nearest cell and freezes ``sampling_offsets`` (as the reference).
    """

    def __init__(self, embed_dim: int = 256, num_heads: int = 8, num_levels: int = 4, num_points=4,
                 method: str = "default", offset_scale: float = 0.5):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
        if method not in ("default", "discrete"):
            raise ValueError(f"cross_attn_method must be 'default' or 'discrete', got {method!r}")
        points = list(num_points) if isinstance(num_points, (list, tuple)) else [int(num_points)] * num_levels
        if len(points) != num_levels:
            raise ValueError(f"num_points {points} must have one entry per level ({num_levels})")
        self.embed_dim, self.num_heads, self.num_levels = embed_dim, num_heads, num_levels
        self.num_points_list = points
        self.offset_scale = offset_scale
        self.method = method
        self.head_dim = embed_dim // num_heads
        self.total_points = num_heads * sum(points)
        self.register_buffer(
            "num_points_scale", torch.tensor([1 / n for n in points for _ in range(n)], dtype=torch.float32))
        self.sampling_offsets = nn.Linear(embed_dim, self.total_points * 2)
        self.attention_weights = nn.Linear(embed_dim, self.total_points)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        self.reset_parameters()
        if method == "discrete":
            for p in self.sampling_offsets.parameters():
                p.requires_grad_(False)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Reference init: offsets point in 8 directions at distances 1..P_l, uniform weights."""
        init.constant_(self.sampling_offsets.weight, 0)
        thetas = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True).values
        grid = grid.reshape(self.num_heads, 1, 2).tile([1, sum(self.num_points_list), 1])
        scaling = torch.cat([torch.arange(1, n + 1) for n in self.num_points_list]).reshape(1, -1, 1)
        self.sampling_offsets.bias.copy_((grid * scaling).flatten())
        init.constant_(self.attention_weights.weight, 0)
        init.constant_(self.attention_weights.bias, 0)
        init.xavier_uniform_(self.value_proj.weight)
        init.constant_(self.value_proj.bias, 0)
        init.xavier_uniform_(self.output_proj.weight)
        init.constant_(self.output_proj.bias, 0)

    def forward(self, query: Tensor, reference_points: Tensor, value: Tensor,
                spatial_shapes: Sequence[Tuple[int, int]], value_mask: Optional[Tensor] = None,
                return_attention: bool = False):
        """``query [B,Q,D]``, ``reference_points [B,Q,1,4]`` (normalised cxcywh),
        ``value [B,S,D]`` (the memory), ``value_mask [B,S]`` (True = keep). Returns ``[B,Q,D]``
        (and ``{"sampling_locations" [B,Q,M,sum P,2], "attention_weights" [B,Q,M,sum P]}``)."""
        bsz, nq = query.shape[:2]
        nv = value.shape[1]
        value = self.value_proj(value)
        if value_mask is not None:
            value = value * value_mask.to(value.dtype).unsqueeze(-1)
        value = value.reshape(bsz, nv, self.num_heads, self.head_dim)
        total = sum(self.num_points_list)
        offsets = self.sampling_offsets(query).reshape(bsz, nq, self.num_heads, total, 2)
        weights = self.attention_weights(query).reshape(bsz, nq, self.num_heads, total)
        weights = F.softmax(weights, dim=-1).reshape(bsz, nq, self.num_heads, total)
        if reference_points.shape[-1] != 4:
            raise ValueError(f"reference points must be boxes [B,Q,1,4], got {tuple(reference_points.shape)}")
        scale = self.num_points_scale.to(dtype=query.dtype).unsqueeze(-1)
        offset = offsets * scale * reference_points[:, :, None, :, 2:] * self.offset_scale
        loc = reference_points[:, :, None, :, :2] + offset
        out = self.output_proj(
            deformable_attention_v2(value, spatial_shapes, loc, weights, self.num_points_list, self.method))
        if return_attention:
            return out, {"sampling_locations": loc, "attention_weights": weights}
        return out


# ============================================================================================
# Decoder
# ============================================================================================


class TransformerDecoderLayer(nn.Module):
    """Post-norm decoder layer: self-attention, deformable cross-attention, FFN, each followed by
    add & LayerNorm (``norm1``, ``norm2``, ``norm3``)."""

    def __init__(self, d_model: int = 256, n_head: int = 8, dim_feedforward: int = 1024, dropout: float = 0.0,
                 activation: str = "relu", n_levels: int = 4, n_points=4, cross_attn_method: str = "default"):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, n_head, dropout=dropout, batch_first=True)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.cross_attn = MSDeformableAttentionV2(d_model, n_head, n_levels, n_points, method=cross_attn_method)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.activation = get_activation(activation)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)
        init.xavier_uniform_(self.linear1.weight)
        init.xavier_uniform_(self.linear2.weight)

    def forward(self, target: Tensor, reference_points: Tensor, memory: Tensor,
                spatial_shapes: Sequence[Tuple[int, int]], attn_mask: Optional[Tensor] = None,
                memory_mask: Optional[Tensor] = None, query_pos_embed: Optional[Tensor] = None,
                return_attention: bool = False):
        """``target [B,T,D]``, ``reference_points [B,T,1,4]``, ``memory [B,S,D]``; ``attn_mask [T,T]``
        bool (True = blocked). Returns ``[B,T,D]`` (and the layer's attention maps)."""
        q = k = target if query_pos_embed is None else target + query_pos_embed
        target2, _ = self.self_attn(q, k, value=target, attn_mask=attn_mask, need_weights=False)
        target = self.norm1(target + self.dropout1(target2))
        query = target if query_pos_embed is None else target + query_pos_embed
        cross = self.cross_attn(query, reference_points, memory, spatial_shapes, memory_mask,
                                return_attention=return_attention)
        maps = None
        if return_attention:
            cross, maps = cross
            maps["self_attn"] = multihead_attention_weights(self.self_attn, q, k, attn_mask)
        target = self.norm2(target + self.dropout2(cross))
        target2 = self.linear2(self.dropout3(self.activation(self.linear1(target))))
        target = self.norm3(target + self.dropout4(target2))
        return (target, maps) if return_attention else target


class TransformerDecoder(nn.Module):
    """``num_layers`` decoder layers; the reference box of layer ``i+1`` is layer ``i``'s box,
    detached. ``eval_idx`` (negative: from the end) is the layer whose predictions inference uses."""

    def __init__(self, hidden_dim: int, decoder_layer: nn.Module, num_layers: int, eval_idx: int = -1):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(decoder_layer) for _ in range(num_layers))
        self.hidden_dim = hidden_dim
        self.num_layers = num_layers
        self.eval_idx = eval_idx if eval_idx >= 0 else num_layers + eval_idx
        if not 0 <= self.eval_idx < num_layers:
            raise ValueError(f"eval_idx {eval_idx} is outside the {num_layers} decoder layers")

    def forward(self, target: Tensor, ref_points: Tensor, memory: Tensor, spatial_shapes,
                bbox_head: Sequence[nn.Module], score_head: Sequence[nn.Module], query_pos_head: nn.Module,
                attn_mask: Optional[Tensor] = None, memory_mask: Optional[Tensor] = None,
                num_layers: Optional[int] = None, return_attention: bool = False) -> Dict[str, Any]:
        """Run the first ``num_layers`` layers (default all) from content ``target [B,T,D]`` and
        normalised reference boxes ``ref_points [B,T,4]`` (detached by the caller).

        Returns ``hidden [L,B,T,D]``, ``references [L,B,T,4]`` (what each layer's box is predicted
        from: the initial reference, then the previous layer's box *not* detached -- refined from
        that layer's detached reference -- so a box loss of layer i also trains the box head of
        layer i-1, and no earlier one, as the reference does),
        ``boxes [L,B,T,4]``, ``logits [L,B,T,C]`` and ``attention`` (per-layer maps or None).
        """
        n = self.num_layers if num_layers is None else num_layers
        ref_detach = ref_points
        ref_grad = ref_points
        hidden, references, boxes, logits, maps = [], [], [], [], []
        output = target
        for i in range(n):
            layer = self.layers[i]
            pos = query_pos_head(ref_detach)
            out = layer(output, ref_detach.unsqueeze(2), memory, spatial_shapes, attn_mask, memory_mask, pos,
                        return_attention=return_attention)
            if return_attention:
                out, layer_maps = out
                maps.append(layer_maps)
            output = out
            delta = bbox_head[i](output)
            hidden.append(output)
            references.append(ref_grad)
            boxes.append(torch.sigmoid(delta + inverse_sigmoid(ref_grad)))
            logits.append(score_head[i](output))
            # the next layer's box is predicted from this refined box: differentiable through this
            # layer's head only (it is refined from the detached reference), not further back
            ref_grad = torch.sigmoid(delta + inverse_sigmoid(ref_detach))
            ref_detach = ref_grad.detach()
        return {
            "hidden": torch.stack(hidden),
            "references": torch.stack(references),
            "boxes": torch.stack(boxes),
            "logits": torch.stack(logits),
            "attention": maps if return_attention else None,
        }


# ============================================================================================
# Anchors and denoising
# ============================================================================================


def generate_anchors(spatial_shapes: Sequence[Tuple[int, int]], grid_size: float = 0.05, eps: float = 0.01,
                     dtype=torch.float32, device=None) -> Tuple[Tensor, Tensor]:
    """One anchor per token: normalised cell centre, size ``grid_size * 2^level``, in logit space
    ``[1,S,4]`` (``+inf`` where any coordinate is within ``eps`` of 0 or 1), and the valid mask
    ``[1,S,1]`` (bool); levels in order, tokens in raster order."""
    out = []
    for lvl, (h, w) in enumerate(spatial_shapes):
        h, w = int(h), int(w)
        gy, gx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        xy = (torch.stack([gx, gy], dim=-1).unsqueeze(0) + 0.5) / torch.tensor([w, h], dtype=dtype)
        wh = torch.ones_like(xy) * grid_size * (2.0 ** lvl)
        out.append(torch.cat([xy, wh], dim=-1).reshape(-1, h * w, 4))
    anchors = torch.cat(out, dim=1)
    if device is not None:
        anchors = anchors.to(device)
    valid = ((anchors > eps) * (anchors < 1 - eps)).all(-1, keepdim=True)
    anchors = torch.log(anchors / (1 - anchors))
    return torch.where(valid, anchors, torch.inf), valid


def contrastive_denoising_group(targets: Sequence[Dict[str, Tensor]], num_classes: int, num_queries: int,
                                class_embed: nn.Module, num_denoising: int = 100, label_noise_ratio: float = 0.5,
                                box_noise_scale: float = 1.0, return_class: bool = False):
    """Contrastive denoising queries of RT-DETR (``get_contrastive_denoising_training_group``).

    With ``G`` the largest GT count (1 dummy slot for a batch without GT) there are
    ``num_group = max(num_denoising // G, 1)`` groups of ``G`` positive then ``G`` negative slots,
    ``N = 2 G num_group`` queries; padded slots have class ``num_classes`` (the padding row of
    ``class_embed``, looked up like any other) and a zero box. Labels of real slots are replaced by a
    random class where ``rand < label_noise_ratio / 2``; box corners move by
    ``sign * u * (w/2, h/2) * box_noise_scale`` with ``u`` in [0, 1) (positives) or [1, 2)
    (negatives), clipped to [0, 1]. Random draws, in this order and from the default generator:
    ``rand_like [B,N]``, ``randint_like [B,N]`` (int32), ``randint_like [B,N,4]``, ``rand_like [B,N,4]``
    (only the draws whose noise is on).

    Returns ``(content [B,N,D], reference_unact [B,N,4], attn_mask [N+Q,N+Q] (True = blocked),
    dn_meta {"dn_positive_idx": per image positive slots, "dn_num_group", "dn_num_split": [N, Q]})``
    or four ``None`` when ``num_denoising <= 0``; with ``return_class`` also the noisy class ids
    ``[B,N]`` (int32, the reference's ``input_query_class``) as a fifth element.
    """
    if num_denoising <= 0:
        return (None,) * (5 if return_class else 4)
    num_gts = [len(t["labels"]) for t in targets]
    device = targets[0]["labels"].device
    max_gt = max(num_gts)
    empty = max_gt == 0
    if empty:  # one dummy slot that never counts as a positive (keeps DDP graphs identical)
        max_gt, num_group = 1, 1
    else:
        num_group = max(num_denoising // max_gt, 1)
    bsz = len(num_gts)
    query_class = torch.full([bsz, max_gt], num_classes, dtype=torch.int32, device=device)
    query_box = torch.zeros([bsz, max_gt, 4], device=device)
    pad_mask = torch.zeros([bsz, max_gt], dtype=torch.bool, device=device)
    if empty:
        query_box[..., :2] = 0.5
        query_box[..., 2:] = 0.1
    for i, n in enumerate(num_gts):
        if n > 0:
            query_class[i, :n] = targets[i]["labels"]
            query_box[i, :n] = targets[i]["boxes"]
            pad_mask[i, :n] = True
    query_class = query_class.tile([1, 2 * num_group])
    query_box = query_box.tile([1, 2 * num_group, 1])
    pad_mask = pad_mask.tile([1, 2 * num_group])
    negative = torch.zeros([bsz, max_gt * 2, 1], device=device)
    negative[:, max_gt:] = 1
    negative = negative.tile([1, num_group, 1])
    positive = (1 - negative).squeeze(-1) * pad_mask
    dn_positive_idx = torch.split(torch.nonzero(positive)[:, 1], [n * num_group for n in num_gts])
    total = int(max_gt * 2 * num_group)

    if label_noise_ratio > 0:
        flip = torch.rand_like(query_class, dtype=torch.float) < (label_noise_ratio * 0.5)
        new_label = torch.randint_like(flip, 0, num_classes, dtype=query_class.dtype)
        query_class = torch.where(flip & pad_mask, new_label, query_class)
    if box_noise_scale > 0:
        corners = box_cxcywh_to_xyxy(query_box)
        diff = torch.tile(query_box[..., 2:] * 0.5, [1, 1, 2]) * box_noise_scale
        sign = torch.randint_like(query_box, 0, 2) * 2.0 - 1.0
        part = torch.rand_like(query_box)
        part = (part + 1.0) * negative + part * (1 - negative)
        corners = corners + sign * part * diff
        query_box = box_xyxy_to_cxcywh(torch.clip(corners, min=0.0, max=1.0))
    reference_unact = inverse_sigmoid(query_box)
    content = class_embed(query_class)

    size = total + num_queries
    attn_mask = torch.zeros([size, size], dtype=torch.bool, device=device)
    attn_mask[total:, :total] = True  # the matching queries do not see the denoising queries
    block = 2 * max_gt
    for g in range(num_group):  # and no denoising group sees another
        rows = slice(block * g, block * (g + 1))
        attn_mask[rows, block * (g + 1):total] = True
        attn_mask[rows, :block * g] = True
    dn_meta = {"dn_positive_idx": dn_positive_idx, "dn_num_group": num_group, "dn_num_split": [total, num_queries]}
    if return_class:
        return content, reference_unact, attn_mask, dn_meta, query_class
    return content, reference_unact, attn_mask, dn_meta


# ============================================================================================
# The decoder module (reference name RTDETRTransformerv2)
# ============================================================================================


class RTDETRTransformerv2(nn.Module):
    """Input projection, query selection, denoising and the decoder with its heads.

    Constructor arguments are the reference's. ``eval_spatial_size`` ``[H, W]`` registers the
    anchors/valid mask of that input size as persistent buffers (``anchors [1,S,4]``,
    ``valid_mask [1,S,1]``; official checkpoints hold them for 640x640); in eval they are used when the
    feature maps have that size, otherwise (and always in training) they are computed -- bitwise
    equal for the same size. ``query_select_method``: ``"default"`` (top-Q tokens by max class
    logit), ``"one2many"`` (top-Q (token, class) pairs; a token may be picked twice) or
    ``"agnostic"`` (one class-agnostic score head). ``learn_query_content``: a learned
    ``tgt_embed`` instead of the selected token features.

    The stages are separate methods (:meth:`project`, :meth:`anchors_for`, :meth:`select`,
    :meth:`denoising`, :meth:`decode`) that :class:`~tprd.modeling.rt_detr.RTDETR` composes.
    """

    def __init__(self, num_classes: int = 80, hidden_dim: int = 256, num_queries: int = 300,
                 feat_channels: Sequence[int] = (512, 1024, 2048), feat_strides: Sequence[int] = (8, 16, 32),
                 num_levels: int = 3, num_points=4, nhead: int = 8, num_layers: int = 6, dim_feedforward: int = 1024,
                 dropout: float = 0.0, activation: str = "relu", num_denoising: int = 100,
                 label_noise_ratio: float = 0.5, box_noise_scale: float = 1.0, learn_query_content: bool = False,
                 eval_spatial_size: Optional[Sequence[int]] = None, eval_idx: int = -1, eps: float = 1e-2,
                 aux_loss: bool = True, cross_attn_method: str = "default", query_select_method: str = "default"):
        super().__init__()
        feat_channels, feat_strides = list(feat_channels), list(feat_strides)
        if len(feat_channels) > num_levels or len(feat_strides) != len(feat_channels):
            raise ValueError(f"feat_channels {feat_channels} / feat_strides {feat_strides} do not fit "
                             f"num_levels={num_levels}")
        for _ in range(num_levels - len(feat_strides)):
            feat_strides.append(feat_strides[-1] * 2)
        if query_select_method not in ("default", "one2many", "agnostic"):
            raise ValueError(f"query_select_method must be default/one2many/agnostic, got {query_select_method!r}")
        self.hidden_dim = hidden_dim
        self.nhead = nhead
        self.feat_strides = feat_strides
        self.num_levels = num_levels
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.eps = eps
        self.num_layers = num_layers
        self.eval_spatial_size = list(eval_spatial_size) if eval_spatial_size else None
        self.aux_loss = aux_loss
        self.cross_attn_method = cross_attn_method
        self.query_select_method = query_select_method

        self.input_proj = nn.ModuleList()
        for ch in feat_channels:
            self.input_proj.append(_conv_norm(ch, hidden_dim, 1, 1, 0))
        ch = feat_channels[-1]
        for _ in range(num_levels - len(feat_channels)):
            self.input_proj.append(_conv_norm(ch, hidden_dim, 3, 2, 1))
            ch = hidden_dim

        layer = TransformerDecoderLayer(hidden_dim, nhead, dim_feedforward, dropout, activation, num_levels,
                                        num_points, cross_attn_method=cross_attn_method)
        self.decoder = TransformerDecoder(hidden_dim, layer, num_layers, eval_idx)

        self.num_denoising = num_denoising
        self.label_noise_ratio = label_noise_ratio
        self.box_noise_scale = box_noise_scale
        if num_denoising > 0:
            self.denoising_class_embed = nn.Embedding(num_classes + 1, hidden_dim, padding_idx=num_classes)
            with torch.no_grad():
                init.normal_(self.denoising_class_embed.weight[:-1])

        self.learn_query_content = learn_query_content
        if learn_query_content:
            self.tgt_embed = nn.Embedding(num_queries, hidden_dim)
        self.query_pos_head = MLP(4, 2 * hidden_dim, hidden_dim, 2)
        self.enc_output = nn.Sequential()
        self.enc_output.add_module("proj", nn.Linear(hidden_dim, hidden_dim))
        self.enc_output.add_module("norm", nn.LayerNorm(hidden_dim))
        self.enc_score_head = nn.Linear(hidden_dim, 1 if query_select_method == "agnostic" else num_classes)
        self.enc_bbox_head = MLP(hidden_dim, hidden_dim, 4, 3)
        self.dec_score_head = nn.ModuleList(nn.Linear(hidden_dim, num_classes) for _ in range(num_layers))
        self.dec_bbox_head = nn.ModuleList(MLP(hidden_dim, hidden_dim, 4, 3) for _ in range(num_layers))

        if self.eval_spatial_size:
            anchors, valid = generate_anchors(self.eval_shapes(), eps=eps)
            self.register_buffer("anchors", anchors)
            self.register_buffer("valid_mask", valid)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Reference init: score biases at prior 0.01, last box layers zero, Xavier projections."""
        bias = _prior_bias(0.01)
        init.constant_(self.enc_score_head.bias, bias)
        init.constant_(self.enc_bbox_head.layers[-1].weight, 0)
        init.constant_(self.enc_bbox_head.layers[-1].bias, 0)
        for cls, reg in zip(self.dec_score_head, self.dec_bbox_head):
            init.constant_(cls.bias, bias)
            init.constant_(reg.layers[-1].weight, 0)
            init.constant_(reg.layers[-1].bias, 0)
        init.xavier_uniform_(self.enc_output.proj.weight)
        if self.learn_query_content:
            init.xavier_uniform_(self.tgt_embed.weight)
        init.xavier_uniform_(self.query_pos_head.layers[0].weight)
        init.xavier_uniform_(self.query_pos_head.layers[1].weight)
        for m in self.input_proj:
            init.xavier_uniform_(m.conv.weight)

    @property
    def eval_idx(self) -> int:
        return self.decoder.eval_idx

    def eval_shapes(self) -> List[Tuple[int, int]]:
        """Per-level ``(h, w)`` at ``eval_spatial_size``."""
        eh, ew = self.eval_spatial_size
        return [(int(eh / s), int(ew / s)) for s in self.feat_strides]

    # ---------------------------------------------------------------------------------------
    def project(self, feats: Sequence[Tensor]) -> Tuple[Tensor, List[Tuple[int, int]], List[Tensor]]:
        """``input_proj`` of every level (extra levels by stride-2 convs) -> ``memory [B,S,D]``
        (levels concatenated, raster order), ``spatial_shapes`` ``[(h, w)] * L`` and the projected maps."""
        maps = [self.input_proj[i](f) for i, f in enumerate(feats)]
        for i in range(len(maps), self.num_levels):
            maps.append(self.input_proj[i](feats[-1] if i == len(feats) else maps[-1]))
        shapes = [(int(m.shape[2]), int(m.shape[3])) for m in maps]
        memory = torch.cat([m.flatten(2).permute(0, 2, 1) for m in maps], 1)
        return memory, shapes, maps

    def anchors_for(self, spatial_shapes: Sequence[Tuple[int, int]], device) -> Tuple[Tensor, Tensor]:
        """The cached anchors/valid mask in eval at ``eval_spatial_size``, else freshly generated."""
        if (not self.training and self.eval_spatial_size and hasattr(self, "anchors")
                and [tuple(s) for s in spatial_shapes] == self.eval_shapes()):
            return self.anchors, self.valid_mask
        return generate_anchors(spatial_shapes, eps=self.eps, device=device)

    def select(self, memory: Tensor, spatial_shapes: Sequence[Tuple[int, int]]) -> Dict[str, Tensor]:
        """Query selection. Returns ``content [B,Q,D]`` (detached selected features, or
        ``tgt_embed``), ``reference_unact [B,Q,4]`` (detached), the differentiable encoder
        predictions of the selected tokens ``pred_logits [B,Q,C]`` / ``pred_boxes [B,Q,4]``
        (sigmoid), ``topk_indices [B,Q]``, ``hidden [B,Q,D]`` and, over all tokens,
        ``token_features [B,S,D]`` (what queries are selected from), ``all_token_logits [B,S,C]``, ``all_token_coords_unact [B,S,4]``, ``anchors``, ``valid_mask``."""
        anchors, valid = self.anchors_for(spatial_shapes, memory.device)
        if anchors.shape[1] != memory.shape[1]:
            raise ValueError(f"{memory.shape[1]} memory tokens but {anchors.shape[1]} anchors "
                             f"(spatial shapes {list(spatial_shapes)})")
        if memory.shape[1] < self.num_queries:
            raise ValueError(f"RT-DETR selects num_queries={self.num_queries} tokens but the feature maps have "
                             f"only {memory.shape[1]} (spatial shapes {list(spatial_shapes)}); use larger images")
        out_memory = self.enc_output(valid.to(memory.dtype) * memory)
        logits = self.enc_score_head(out_memory)
        coords = self.enc_bbox_head(out_memory) + anchors
        if self.query_select_method == "default":
            topk = torch.topk(logits.max(-1).values, self.num_queries, dim=-1)[1]
        elif self.query_select_method == "one2many":
            topk = torch.topk(logits.flatten(1), self.num_queries, dim=-1)[1] // self.num_classes
        else:
            topk = torch.topk(logits.squeeze(-1), self.num_queries, dim=-1)[1]
        top_coords = coords.gather(1, topk.unsqueeze(-1).repeat(1, 1, coords.shape[-1]))
        top_logits = logits.gather(1, topk.unsqueeze(-1).repeat(1, 1, logits.shape[-1]))
        top_memory = out_memory.gather(1, topk.unsqueeze(-1).repeat(1, 1, out_memory.shape[-1]))
        if self.learn_query_content:
            content = self.tgt_embed.weight.unsqueeze(0).tile([memory.shape[0], 1, 1])
        else:
            content = top_memory.detach()
        return {
            "content": content,
            "reference_unact": top_coords.detach(),
            "pred_logits": top_logits,
            "pred_boxes": torch.sigmoid(top_coords),
            "topk_indices": topk,
            "hidden": top_memory,
            "token_features": out_memory,
            "all_token_logits": logits,
            "all_token_coords_unact": coords,
            "anchors": anchors,
            "valid_mask": valid,
        }

    def denoising(self, targets: Sequence[Dict[str, Tensor]]):
        """:func:`contrastive_denoising_group` with this module's settings and ``return_class=True``:
        ``(content, reference_unact, attn_mask, dn_meta, noisy class ids)`` (five ``None`` when off)."""
        if self.num_denoising <= 0 or targets is None:
            return None, None, None, None, None
        return contrastive_denoising_group(targets, self.num_classes, self.num_queries, self.denoising_class_embed,
                                           self.num_denoising, self.label_noise_ratio, self.box_noise_scale,
                                           return_class=True)

    def decode(self, content: Tensor, reference: Tensor, memory: Tensor, spatial_shapes, attn_mask=None,
               num_layers: Optional[int] = None, return_attention: bool = False) -> Dict[str, Any]:
        """:class:`TransformerDecoder` with this module's heads; ``reference`` normalised ``[B,T,4]``."""
        return self.decoder(content, reference, memory, spatial_shapes, self.dec_bbox_head, self.dec_score_head,
                            self.query_pos_head, attn_mask=attn_mask, num_layers=num_layers,
                            return_attention=return_attention)


def _conv_norm(ch_in: int, ch_out: int, k: int, stride: int, padding: int) -> nn.Sequential:
    seq = nn.Sequential()
    seq.add_module("conv", nn.Conv2d(ch_in, ch_out, k, stride, padding=padding, bias=False))
    seq.add_module("norm", nn.BatchNorm2d(ch_out))
    return seq
