"""Deformable DETR (Zhu et al., ICLR 2021): plain, with iterative box refinement, and two-stage.

The model reads top to bottom as the paper does::

    images --backbone--> res3..res5 --neck--> 4 maps [B,256,H_l,W_l] (+ padding masks)
           --sine position + level embedding, flatten--> tokens [B,S,256]
           --deformable encoder--> memory [B,S,256]
           --queries: learned table (or top-k encoder proposals, two-stage)-->
           --decoder: self-attention + deformable cross-attention, L layers--> hidden [L,B,Q,256]
           --heads: class Linear, box MLP (+ inverse-sigmoid reference)--> logits [L,B,Q,C], boxes [L,B,Q,4]

Numerics follow detrex (``projects/deformable_detr``) operation by operation, so a detrex checkpoint
converted with :meth:`DeformableDETR.convert_detrex_state_dict` gives the same outputs. Module
names are our own (``self_attn``, ``cross_attn``, ``ffn.linear1``, ``norm1`` ...); the conversion
maps detrex's (``attentions.0``, ``ffns.0.layers.0.0``, ``norms.0`` ...). Heads that detrex shares
between stages (no box refinement) are stored once (``class_embed.0``, ``bbox_embed.0``).

Beyond detrex, :meth:`DeformableDETR.forward_outputs` decodes extra query groups in the same
decoder pass (block-diagonal self-attention mask), returns stacked per-stage predictions and the
intermediate tensors distillation methods tap, and the padding masks are correct in eval as well.
"""
from __future__ import annotations

import math
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers.box_ops import box_xyxy_to_cxcywh, inverse_sigmoid
from ..layers.mlp import MLP
from ..layers.ms_deform_attn import MultiScaleDeformableAttention
from ..layers.position_embedding import PositionEmbeddingSine
from .backbone import ChannelMapper, ResNet, convert_detectron2_resnet_keys
from .criterion import SetCriterion
from .matcher import HungarianMatcher
from .outputs import DetectorOutputs, ImageBatch, QueryGroup, StagePredictions
from .postprocess import detector_postprocess, select_topk

__all__ = [
    "DeformableDETR",
    "DeformableTransformer",
    "DeformableTransformerEncoder",
    "DeformableTransformerDecoder",
    "DeformableEncoderLayer",
    "DeformableDecoderLayer",
    "FFN",
    "images_to_batch",
    "level_masks",
]


# ============================================================================================
# Transformer layers
# ============================================================================================


class FFN(nn.Module):
    """``linear2(dropout(relu(linear1(x))))`` followed by dropout (no residual)."""

    def __init__(self, embed_dim: int = 256, feedforward_dim: int = 1024, dropout: float = 0.1):
        super().__init__()
        self.linear1 = nn.Linear(embed_dim, feedforward_dim)
        self.linear2 = nn.Linear(feedforward_dim, embed_dim)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout2(self.linear2(self.dropout1(F.relu(self.linear1(x)))))


class DeformableEncoderLayer(nn.Module):
    """Post-norm encoder layer: deformable self-attention over all levels, then FFN."""

    def __init__(self, embed_dim=256, num_heads=8, feedforward_dim=1024, attn_dropout=0.1, ffn_dropout=0.1,
                 num_levels=4, num_points=4):
        super().__init__()
        self.self_attn = MultiScaleDeformableAttention(embed_dim, num_heads, num_levels, num_points)
        self.dropout = nn.Dropout(attn_dropout)
        self.norm1 = nn.LayerNorm(embed_dim)
        self.ffn = FFN(embed_dim, feedforward_dim, ffn_dropout)
        self.norm2 = nn.LayerNorm(embed_dim)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask):
        """``src``, ``pos`` ``[B,S,D]``; ``reference_points [B,S,L,2]``; ``padding_mask [B,S]``."""
        attn = self.self_attn(src, src, reference_points, spatial_shapes, level_start_index,
                              query_pos=pos, value_padding_mask=padding_mask)
        src = self.norm1(src + self.dropout(attn))
        return self.norm2(src + self.ffn(src))


class DeformableDecoderLayer(nn.Module):
    """Post-norm decoder layer: query self-attention, deformable cross-attention into the memory, FFN."""

    def __init__(self, embed_dim=256, num_heads=8, feedforward_dim=1024, attn_dropout=0.1, ffn_dropout=0.1,
                 num_levels=4, num_points=4):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(embed_dim, num_heads, dropout=attn_dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(embed_dim)
        self.cross_attn = MultiScaleDeformableAttention(embed_dim, num_heads, num_levels, num_points)
        self.dropout = nn.Dropout(attn_dropout)
        self.norm2 = nn.LayerNorm(embed_dim)
        self.ffn = FFN(embed_dim, feedforward_dim, ffn_dropout)
        self.norm3 = nn.LayerNorm(embed_dim)

    def forward(self, tgt, query_pos, reference_points, memory, spatial_shapes, level_start_index,
                memory_padding_mask, self_attn_mask=None, return_attention=False):
        """``tgt``, ``query_pos`` ``[B,Q,D]``; ``reference_points [B,Q,L,2|4]`` (already scaled by the
        valid ratios); ``memory [B,S,D]``. Returns ``(tgt, attention)`` where ``attention`` is ``None``
        or ``{"self_attn" [B,M,Q,Q], "sampling_locations", "attention_weights"}``."""
        q = k = tgt + query_pos
        attn, self_weights = self.self_attn(q, k, tgt, attn_mask=self_attn_mask, need_weights=return_attention,
                                            average_attn_weights=False)
        tgt = self.norm1(tgt + attn)
        cross = self.cross_attn(tgt, memory, reference_points, spatial_shapes, level_start_index,
                                query_pos=query_pos, value_padding_mask=memory_padding_mask,
                                return_sampling=return_attention)
        maps = None
        if return_attention:
            cross, maps = cross
            maps = {"self_attn": self_weights, **maps}
        tgt = self.norm2(tgt + self.dropout(cross))
        tgt = self.norm3(tgt + self.ffn(tgt))
        return tgt, maps


class DeformableTransformerEncoder(nn.Module):
    """``num_layers`` encoder layers (detrex ``DeformableDetrTransformerEncoder`` arguments)."""

    def __init__(self, embed_dim=256, num_heads=8, feedforward_dim=1024, attn_dropout=0.1, ffn_dropout=0.1,
                 num_layers=6, post_norm=False, num_feature_levels=4, num_points=4):
        super().__init__()
        self.embed_dim = embed_dim
        self.num_layers = num_layers
        self.layers = nn.ModuleList(
            DeformableEncoderLayer(embed_dim, num_heads, feedforward_dim, attn_dropout, ffn_dropout,
                                   num_feature_levels, num_points)
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(embed_dim) if post_norm else None

    @staticmethod
    def reference_points(spatial_shapes: Tensor, valid_ratios: Tensor) -> Tensor:
        """Centre of every valid-area cell of every level, normalised by the valid size and mapped
        to each level: ``[B,S,L,2]``."""
        refs = []
        for lvl, (h, w) in enumerate(spatial_shapes.tolist()):
            ref_y, ref_x = torch.meshgrid(
                torch.linspace(0.5, h - 0.5, h, dtype=torch.float32, device=valid_ratios.device),
                torch.linspace(0.5, w - 0.5, w, dtype=torch.float32, device=valid_ratios.device),
                indexing="ij",
            )
            ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)
            ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
            refs.append(torch.stack((ref_x, ref_y), -1))
        return torch.cat(refs, 1)[:, :, None] * valid_ratios[:, None]

    def forward(self, src, pos, spatial_shapes, level_start_index, valid_ratios, padding_mask):
        """``src``/``pos`` ``[B,S,D]`` -> memory ``[B,S,D]``."""
        reference_points = self.reference_points(spatial_shapes, valid_ratios)
        for layer in self.layers:
            src = layer(src, pos, reference_points, spatial_shapes, level_start_index, padding_mask)
        return self.norm(src) if self.norm is not None else src


class DeformableTransformerDecoder(nn.Module):
    """``num_layers`` decoder layers (detrex ``DeformableDetrTransformerDecoder`` arguments).

    ``return_intermediate`` is accepted for config compatibility; every stage is always returned.
    """

    def __init__(self, embed_dim=256, num_heads=8, feedforward_dim=1024, attn_dropout=0.1, ffn_dropout=0.1,
                 num_layers=6, return_intermediate=True, num_feature_levels=4, num_points=4):
        super().__init__()
        self.embed_dim = embed_dim
        self.num_layers = num_layers
        self.layers = nn.ModuleList(
            DeformableDecoderLayer(embed_dim, num_heads, feedforward_dim, attn_dropout, ffn_dropout,
                                   num_feature_levels, num_points)
            for _ in range(num_layers)
        )

    def forward(self, tgt, query_pos, reference, memory, spatial_shapes, level_start_index, valid_ratios,
                memory_padding_mask, self_attn_mask=None, bbox_embed=None, return_attention=False):
        """Decode queries ``tgt``/``query_pos`` ``[B,Q,D]`` from normalised ``reference [B,Q,2|4]``.

        ``bbox_embed``: per-layer box heads for iterative refinement (the reference of layer l+1 is
        layer l's predicted box, detached), or ``None`` (the reference stays fixed).
        Returns ``hidden [L,B,Q,D]``, ``references [L,B,Q,2|4]`` (the reference each layer received),
        ``next_reference`` (after the last layer) and the per-layer attention maps (or ``None``).
        """
        hidden, references, maps = [], [], []
        for lid, layer in enumerate(self.layers):
            if reference.shape[-1] == 4:
                ref_input = reference[:, :, None] * torch.cat([valid_ratios, valid_ratios], -1)[:, None]
            else:
                ref_input = reference[:, :, None] * valid_ratios[:, None]
            references.append(reference)
            tgt, layer_maps = layer(tgt, query_pos, ref_input, memory, spatial_shapes, level_start_index,
                                    memory_padding_mask, self_attn_mask, return_attention)
            if bbox_embed is not None:
                reference = _refine(bbox_embed[lid](tgt), reference).detach()
            hidden.append(tgt)
            maps.append(layer_maps)
        return torch.stack(hidden), _stack_references(references), reference, (maps if return_attention else None)


def _stack_references(refs: List[Tensor]):
    """``[L,B,Q,r]`` when every layer got the same kind of reference; otherwise (a 2-d point refined
    into boxes after the first layer) the list of per-layer references."""
    if len({r.shape[-1] for r in refs}) == 1:
        return torch.stack(refs)
    return refs


def _slice_queries(refs, s: slice):
    if isinstance(refs, Tensor):
        return refs[:, :, s]
    return [r[:, s] for r in refs]


def _refine(delta: Tensor, reference: Tensor) -> Tensor:
    """Box = sigmoid(delta + inverse_sigmoid(reference)); a 2-d reference only shifts the centre."""
    ref = inverse_sigmoid(reference)
    if ref.shape[-1] == 4:
        return (delta + ref).sigmoid()
    return torch.cat([delta[..., :2] + ref, delta[..., 2:]], -1).sigmoid()


class DeformableTransformer(nn.Module):
    """Encoder + decoder + level embeddings + the query initialisation parameters.

    Single-stage: ``reference_points`` Linear(D -> 2) maps the positional half of a query to its
    2-d reference. Two-stage: ``enc_output`` (+ ``enc_output_norm``) turns memory into proposals and
    ``pos_trans`` (+ ``pos_trans_norm``) embeds the selected proposal boxes into queries.
    """

    def __init__(self, encoder: DeformableTransformerEncoder, decoder: DeformableTransformerDecoder,
                 as_two_stage: bool = False, num_feature_levels: int = 4, two_stage_num_proposals: int = 300):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.as_two_stage = as_two_stage
        self.num_feature_levels = num_feature_levels
        self.two_stage_num_proposals = two_stage_num_proposals
        self.embed_dim = encoder.embed_dim
        self.level_embeds = nn.Parameter(torch.empty(num_feature_levels, self.embed_dim))
        if as_two_stage:
            self.enc_output = nn.Linear(self.embed_dim, self.embed_dim)
            self.enc_output_norm = nn.LayerNorm(self.embed_dim)
            self.pos_trans = nn.Linear(self.embed_dim * 2, self.embed_dim * 2)
            self.pos_trans_norm = nn.LayerNorm(self.embed_dim * 2)
        else:
            self.reference_points = nn.Linear(self.embed_dim, 2)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """detrex init: Xavier-uniform for every matrix, deformable-attention init, Xavier-normal
        reference-point layer with zero bias, N(0,1) level embeddings."""
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MultiScaleDeformableAttention):
                m.reset_parameters()
        if not self.as_two_stage:
            nn.init.xavier_normal_(self.reference_points.weight, gain=1.0)
            nn.init.zeros_(self.reference_points.bias)
        nn.init.normal_(self.level_embeds)

    @staticmethod
    def valid_ratio(mask: Tensor) -> Tensor:
        """``[B,2]`` (w, h) fraction of valid cells along the first row/column of ``mask [B,H,W]``."""
        _, h, w = mask.shape
        valid_h = torch.sum(~mask[:, :, 0], 1)
        valid_w = torch.sum(~mask[:, 0, :], 1)
        return torch.stack([valid_w.float() / w, valid_h.float() / h], -1)

    def gen_encoder_output_proposals(self, memory: Tensor, padding_mask: Tensor, spatial_shapes: Tensor):
        """One proposal per valid token: cell centre, size 0.05 * 2^level (un-sigmoided ``[B,S,4]``,
        ``inf`` on padding and near the border) and the projected memory ``[B,S,D]`` (zero there)."""
        bsz = memory.shape[0]
        proposals, start = [], 0
        for lvl, (h, w) in enumerate(spatial_shapes.tolist()):
            mask_l = padding_mask[:, start:start + h * w].view(bsz, h, w, 1)
            valid_h = torch.sum(~mask_l[:, :, 0, 0], 1)
            valid_w = torch.sum(~mask_l[:, 0, :, 0], 1)
            grid_y, grid_x = torch.meshgrid(
                torch.linspace(0, h - 1, h, dtype=torch.float32, device=memory.device),
                torch.linspace(0, w - 1, w, dtype=torch.float32, device=memory.device),
                indexing="ij",
            )
            grid = torch.cat([grid_x.unsqueeze(-1), grid_y.unsqueeze(-1)], -1)
            scale = torch.cat([valid_w.unsqueeze(-1), valid_h.unsqueeze(-1)], 1).view(bsz, 1, 1, 2)
            grid = (grid.unsqueeze(0).expand(bsz, -1, -1, -1) + 0.5) / scale
            wh = torch.ones_like(grid) * 0.05 * (2.0**lvl)
            proposals.append(torch.cat((grid, wh), -1).view(bsz, -1, 4))
            start += h * w
        proposals = torch.cat(proposals, 1)
        valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
        proposals = torch.log(proposals / (1 - proposals))
        proposals = proposals.masked_fill(padding_mask.unsqueeze(-1), float("inf"))
        proposals = proposals.masked_fill(~valid, float("inf"))
        out = memory.masked_fill(padding_mask.unsqueeze(-1), 0.0).masked_fill(~valid, 0.0)
        return self.enc_output_norm(self.enc_output(out)), proposals

    @staticmethod
    def proposal_pos_embed(proposals: Tensor, num_pos_feats: int = 128, temperature: float = 10000) -> Tensor:
        """Sine embedding of un-sigmoided boxes ``[B,Q,4]`` -> ``[B,Q,4*num_pos_feats]``."""
        dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=proposals.device)
        dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
        pos = (proposals.sigmoid() * (2 * math.pi))[:, :, :, None] / dim_t
        return torch.stack((pos[:, :, :, 0::2].sin(), pos[:, :, :, 1::2].cos()), dim=4).flatten(2)


# ============================================================================================
# Batching and masks
# ============================================================================================


def images_to_batch(images: Sequence[Tensor], pixel_mean: Tensor, pixel_std: Tensor) -> ImageBatch:
    """Normalise each ``[3,h,w]`` image, pad bottom/right with 0 to the largest size; mask True on padding."""
    normed = [(img.to(pixel_mean.device, torch.float32) - pixel_mean) / pixel_std for img in images]
    sizes = [tuple(int(s) for s in x.shape[-2:]) for x in normed]
    hmax = max(h for h, _ in sizes)
    wmax = max(w for _, w in sizes)
    tensor = normed[0].new_zeros(len(normed), 3, hmax, wmax)
    mask = torch.ones(len(normed), hmax, wmax, dtype=torch.bool, device=tensor.device)
    for i, (x, (h, w)) in enumerate(zip(normed, sizes)):
        tensor[i, :, :h, :w] = x
        mask[i, :h, :w] = False
    return ImageBatch(tensor=tensor, mask=mask, image_sizes=sizes)


def _halvings_extent(n: int, full: int, target: int) -> int:
    """Valid extent at a level of size ``target`` reached from ``full`` by stride-2 steps
    (each step ``ceil(x/2)``), for ``n`` valid input pixels; proportional if no such chain exists."""
    size, valid = full, n
    while size > target:
        size, valid = -(-size // 2), -(-valid // 2)
    if size == target:
        return max(valid, 1)
    return max(1, math.ceil(n * target / full))


def level_masks(mask: Tensor, image_sizes: Sequence[Tuple[int, int]], shapes: Sequence[Tuple[int, int]],
                mode: str = "nearest") -> List[Tensor]:
    """Padding mask of every feature level (``True`` = padding).

    ``"nearest"`` (detrex): ``F.interpolate`` of the pixel mask, nearest mode -- at coarse levels a
    cell can be marked valid although it only saw padding. ``"exact"``: the valid extent of image
    ``b`` at a level is what its feature map would have alone (repeated ``ceil(x/2)``), so a padded
    image is treated exactly as the same image alone.
    """
    if mode == "nearest":
        m = mask[None].float()
        return [F.interpolate(m, size=s).to(torch.bool)[0] for s in shapes]
    if mode != "exact":
        raise ValueError(f"mask_mode must be 'nearest' or 'exact', got {mode!r}")
    full_h, full_w = mask.shape[-2:]
    out = []
    for h_l, w_l in shapes:
        vh = torch.tensor([_halvings_extent(h, full_h, h_l) for h, _ in image_sizes], device=mask.device)
        vw = torch.tensor([_halvings_extent(w, full_w, w_l) for _, w in image_sizes], device=mask.device)
        rows = torch.arange(h_l, device=mask.device)[None, :, None] >= vh[:, None, None]
        cols = torch.arange(w_l, device=mask.device)[None, None, :] >= vw[:, None, None]
        out.append(rows | cols)
    return out


# ============================================================================================
# The detector
# ============================================================================================


class DeformableDETR(nn.Module):
    """Deformable DETR with detrex's constructor arguments.

    Args:
        backbone: returns a dict of feature maps (e.g. :class:`~tprd.modeling.backbone.ResNet`).
        position_embedding: :class:`~tprd.layers.position_embedding.PositionEmbeddingSine`.
        neck: maps the backbone dict to a list of ``num_feature_levels`` maps of ``embed_dim``.
        transformer: :class:`DeformableTransformer`.
        num_classes, num_queries: foreground classes (sigmoid, no background) and query count.
        criterion: :class:`~tprd.modeling.criterion.SetCriterion` (training only).
        pixel_mean, pixel_std: RGB normalisation of 0..255 inputs.
        aux_loss: supervise every decoder stage (else the final one only).
        with_box_refine: per-layer heads; each layer refines the previous layer's box.
        as_two_stage: queries from the top-k encoder proposals (needs ``with_box_refine`` in detrex
            configs, but works without).
        select_box_nums_for_evaluation: top-k detections kept per image.
        mask_mode: per-level padding masks, ``"nearest"`` (detrex) or ``"exact"``.
        device: where to put the model (``None``: leave it).
    """

    def __init__(
        self,
        backbone: nn.Module,
        position_embedding: nn.Module,
        neck: nn.Module,
        transformer: DeformableTransformer,
        num_classes: int,
        num_queries: int,
        criterion: Optional[SetCriterion] = None,
        pixel_mean: Sequence[float] = (123.675, 116.280, 103.530),
        pixel_std: Sequence[float] = (58.395, 57.120, 57.375),
        embed_dim: int = 256,
        aux_loss: bool = True,
        with_box_refine: bool = False,
        as_two_stage: bool = False,
        select_box_nums_for_evaluation: int = 100,
        mask_mode: str = "nearest",
        device: Optional[str] = None,
    ):
        super().__init__()
        if transformer.as_two_stage != as_two_stage:
            raise ValueError(
                f"as_two_stage={as_two_stage} but transformer.as_two_stage={transformer.as_two_stage}; "
                "set both (model.as_two_stage and model.transformer.as_two_stage) to the same value"
            )
        if mask_mode not in ("nearest", "exact"):
            raise ValueError(f"mask_mode must be 'nearest' or 'exact', got {mask_mode!r}")
        self.backbone = backbone
        self.neck = neck
        self.position_embedding = position_embedding
        self.transformer = transformer
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.embed_dim = embed_dim
        self.aux_loss = aux_loss
        self.with_box_refine = with_box_refine
        self.as_two_stage = as_two_stage
        self.select_box_nums_for_evaluation = select_box_nums_for_evaluation
        self.mask_mode = mask_mode
        self.criterion = criterion
        if criterion is not None:
            criterion.aux_loss = aux_loss
        if not as_two_stage:
            self.query_embedding = nn.Embedding(num_queries, embed_dim * 2)
        # Heads. Without box refinement one class head and one box head serve every stage (and the
        # two-stage proposals); with it each decoder layer (+ the encoder, two-stage) has its own.
        num_pred = transformer.decoder.num_layers + (1 if as_two_stage else 0)
        num_heads = num_pred if with_box_refine else 1
        self.class_embed = nn.ModuleList(nn.Linear(embed_dim, num_classes) for _ in range(num_heads))
        self.bbox_embed = nn.ModuleList(MLP(embed_dim, embed_dim, 4, 3) for _ in range(num_heads))
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(3, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(3, 1, 1), False)
        self.reset_head_parameters()
        if device is not None:
            self.to(device)

    @torch.no_grad()
    def reset_head_parameters(self) -> None:
        """detrex init: class bias -log(99) (prior 0.01); last box layer zero; per-stage heads (box
        refinement) identical copies; box size bias -2 on the first box head only (0 in two-stage);
        neck convs Xavier-uniform with zero bias."""
        bias_value = -math.log((1 - 0.01) / 0.01)
        nn.init.constant_(self.class_embed[0].bias, bias_value)
        nn.init.zeros_(self.bbox_embed[0].layers[-1].weight)
        nn.init.zeros_(self.bbox_embed[0].layers[-1].bias)
        for heads in (self.class_embed, self.bbox_embed):  # per-stage heads start as copies (detrex)
            for head in heads[1:]:
                head.load_state_dict(heads[0].state_dict())
        if not self.as_two_stage:
            self.bbox_embed[0].layers[-1].bias[2:] = -2.0
        for m in self.neck.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight, gain=1)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def num_stages(self) -> int:
        return self.transformer.decoder.num_layers

    def _heads(self, stage: int) -> Tuple[nn.Module, nn.Module]:
        i = stage if self.with_box_refine else 0
        return self.class_embed[i], self.bbox_embed[i]

    # ---------------------------------------------------------------------------------------
    # Inputs
    # ---------------------------------------------------------------------------------------
    def preprocess(self, batched_inputs: Sequence[Dict[str, Any]]) -> ImageBatch:
        """Normalised, zero-padded ``[B,3,H,W]`` batch and its padding mask (``True`` = padding)."""
        return images_to_batch([x["image"] for x in batched_inputs], self.pixel_mean, self.pixel_std)

    def prepare_targets(self, batched_inputs: Sequence[Dict[str, Any]]) -> List[Dict[str, Tensor]]:
        """``{"labels" [G], "boxes" [G,4]}`` per image; boxes normalised cxcywh by the image's own size."""
        targets = []
        for x in batched_inputs:
            h, w = x["image"].shape[-2:]
            boxes = torch.as_tensor(x.get("gt_boxes", torch.zeros(0, 4)), dtype=torch.float32, device=self.device)
            labels = torch.as_tensor(x.get("gt_classes", torch.zeros(0)), dtype=torch.int64, device=self.device)
            scale = torch.as_tensor([w, h, w, h], dtype=torch.float32, device=self.device)
            targets.append({"labels": labels, "boxes": box_xyxy_to_cxcywh(boxes.reshape(-1, 4) / scale)})
        return targets

    # ---------------------------------------------------------------------------------------
    # Backbone -> neck -> encoder
    # ---------------------------------------------------------------------------------------
    def extract_features(self, images: ImageBatch):
        """Backbone dict, neck maps (list of ``[B,D,H_l,W_l]``) and their padding masks."""
        features = self.backbone(images.tensor)
        feats = self.neck(features)
        masks = level_masks(images.mask, images.image_sizes, [f.shape[-2:] for f in feats], self.mask_mode)
        return features, feats, masks

    def encode(self, feats: Sequence[Tensor], masks: Sequence[Tensor]) -> Dict[str, Tensor]:
        """Add sine + level embeddings, flatten the levels and run the encoder.

        Returns ``memory [B,S,D]``, ``memory_mask [B,S]``, ``pos [B,S,D]``, ``spatial_shapes [L,2]``,
        ``level_start_index [L]``, ``valid_ratios [B,L,2]``.
        """
        tr = self.transformer
        src, pos, mask_flat, shapes = [], [], [], []
        for lvl, (feat, mask) in enumerate(zip(feats, masks)):
            shapes.append(feat.shape[-2:])
            pos_l = self.position_embedding(mask).flatten(2).transpose(1, 2)
            pos.append(pos_l + tr.level_embeds[lvl].view(1, 1, -1))
            src.append(feat.flatten(2).transpose(1, 2))
            mask_flat.append(mask.flatten(1))
        src, pos, mask_flat = torch.cat(src, 1), torch.cat(pos, 1), torch.cat(mask_flat, 1)
        spatial_shapes = torch.as_tensor([tuple(s) for s in shapes], dtype=torch.long, device=src.device)
        level_start_index = torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))
        valid_ratios = torch.stack([tr.valid_ratio(m) for m in masks], 1)
        memory = tr.encoder(src, pos, spatial_shapes, level_start_index, valid_ratios, mask_flat)
        return {
            "memory": memory,
            "memory_mask": mask_flat,
            "pos": pos,
            "spatial_shapes": spatial_shapes,
            "level_start_index": level_start_index,
            "valid_ratios": valid_ratios,
        }

    # ---------------------------------------------------------------------------------------
    # Queries -> decoder -> heads
    # ---------------------------------------------------------------------------------------
    def initial_queries(self, enc: Dict[str, Tensor]) -> Tuple[QueryGroup, Optional[Dict[str, Tensor]]]:
        """The main query group and, two-stage, the encoder proposals.

        Single-stage: the learned ``[Q, 2D]`` table split into position and content halves, reference
        ``sigmoid(reference_points(position))`` ``[B,Q,2]``. Two-stage: the top-k encoder proposals
        by class-0 logit; reference = their (detached) boxes ``[B,Q,4]``, position/content from the
        sine embedding of the boxes. Proposals: ``{"pred_logits" [B,S,C], "pred_boxes" [B,S,4],
        "pred_boxes_unact" [B,S,4], "topk_indices" [B,Q]}``.
        """
        memory = enc["memory"]
        bsz, _, d = memory.shape
        tr = self.transformer
        if not self.as_two_stage:
            position, content = torch.split(self.query_embedding.weight, d, dim=1)
            position = position.unsqueeze(0).expand(bsz, -1, -1)
            content = content.unsqueeze(0).expand(bsz, -1, -1)
            reference = tr.reference_points(position).sigmoid()
            return QueryGroup("main", content, reference, position), None
        out_memory, proposals = tr.gen_encoder_output_proposals(memory, enc["memory_mask"], enc["spatial_shapes"])
        cls_head, box_head = self._heads(self.num_stages)
        enc_logits = cls_head(out_memory)
        enc_coord_unact = box_head(out_memory) + proposals
        topk = torch.topk(enc_logits[..., 0], tr.two_stage_num_proposals, dim=1)[1]
        topk_coords = torch.gather(enc_coord_unact, 1, topk.unsqueeze(-1).expand(-1, -1, 4)).detach()
        reference = topk_coords.sigmoid()
        pos_trans = tr.pos_trans_norm(tr.pos_trans(tr.proposal_pos_embed(topk_coords, num_pos_feats=d // 2)))
        position, content = torch.split(pos_trans, d, dim=2)
        enc_out = {
            "pred_logits": enc_logits,
            "pred_boxes": enc_coord_unact.sigmoid(),
            "pred_boxes_unact": enc_coord_unact,
            "topk_indices": topk,
        }
        return QueryGroup("main", content, reference, position), enc_out

    def _group_tensors(self, group: QueryGroup, bsz: int):
        content, position, reference = group.content, group.position, group.reference
        if position is None:
            raise ValueError(f"query group {group.name!r}: Deformable DETR queries need a position (query_pos)")
        if content.dim() == 2:
            content = content.unsqueeze(0).expand(bsz, -1, -1)
        if position.dim() == 2:
            position = position.unsqueeze(0).expand(bsz, -1, -1)
        if reference is None:
            if self.as_two_stage:
                raise ValueError(f"query group {group.name!r}: two-stage Deformable DETR needs explicit references")
            reference = self.transformer.reference_points(position).sigmoid()
        elif reference.dim() == 2:
            reference = reference.unsqueeze(0).expand(bsz, -1, -1)
        return content, position, reference

    def predict(self, hidden: Tensor, references: Tensor) -> Tuple[Tensor, Tensor]:
        """Heads on every stage: ``hidden [L,B,Q,D]``, input references ``[L,B,Q,2|4]`` ->
        logits ``[L,B,Q,C]``, boxes ``[L,B,Q,4]`` (sigmoid(box MLP + inverse_sigmoid(reference)))."""
        logits, boxes = [], []
        for l in range(hidden.shape[0]):
            cls_head, box_head = self._heads(l)
            logits.append(cls_head(hidden[l]))
            boxes.append(_refine(box_head(hidden[l]), references[l]))
        return torch.stack(logits), torch.stack(boxes)

    def decode(
        self,
        enc: Dict[str, Tensor],
        main: QueryGroup,
        query_groups: Sequence[QueryGroup] = (),
        return_attention: bool = False,
    ):
        """Decode the main group and any extra groups in one pass; groups attend only to themselves.

        Returns ``(main StagePredictions, {name: StagePredictions}, attention maps or None,
        group slices, next_reference of the main group)``.
        """
        bsz = enc["memory"].shape[0]
        groups = [main] + list(query_groups)
        names = [g.name for g in groups]
        if len(set(names)) != len(names):
            raise ValueError(f"query group names must be unique, got {names}")
        parts = [self._group_tensors(g, bsz) for g in groups]
        dims = {p[2].shape[-1] for p in parts}
        if len(dims) != 1:
            raise ValueError(
                f"all query groups need references of the same size as the main group "
                f"({main.reference.shape[-1]}-d), got {[p[2].shape[-1] for p in parts]}"
            )
        sizes = [p[0].shape[1] for p in parts]
        content = torch.cat([p[0] for p in parts], 1)
        position = torch.cat([p[1] for p in parts], 1)
        reference = torch.cat([p[2] for p in parts], 1)
        attn_mask = None
        if len(groups) > 1:
            gid = torch.repeat_interleave(torch.arange(len(groups), device=content.device),
                                          torch.as_tensor(sizes, device=content.device))
            attn_mask = gid[:, None] != gid[None, :]
        hidden, references, next_ref, maps = self.transformer.decoder(
            content, position, reference, enc["memory"], enc["spatial_shapes"], enc["level_start_index"],
            enc["valid_ratios"], enc["memory_mask"], self_attn_mask=attn_mask,
            bbox_embed=self.bbox_embed if self.with_box_refine else None, return_attention=return_attention,
        )
        logits, boxes = self.predict(hidden, references)
        slices, start = {}, 0
        for name, n in zip(names, sizes):
            slices[name] = slice(start, start + n)
            start += n
        preds = {
            name: StagePredictions(logits[:, :, s], boxes[:, :, s], hidden[:, :, s], _slice_queries(references, s))
            for name, s in slices.items()
        }
        main_preds = preds.pop(main.name)
        return main_preds, preds, maps, slices, next_ref[:, slices[main.name]]

    # ---------------------------------------------------------------------------------------
    # Full stage-wise forward
    # ---------------------------------------------------------------------------------------
    def encode_images(self, images: ImageBatch) -> Tuple[Dict[str, Tensor], Dict[str, Any]]:
        """Backbone, neck and encoder: the encoder state and the feature taps."""
        features, feats, masks = self.extract_features(images)
        enc = self.encode(feats, masks)
        return enc, {"backbone": features, "neck": feats, "neck_masks": masks}

    def decode_memory(
        self,
        enc: Dict[str, Tensor],
        query_groups: Sequence[QueryGroup] = (),
        return_attention: bool = False,
        taps: Optional[Dict[str, Any]] = None,
    ) -> DetectorOutputs:
        """Queries, decoder and heads on an encoder state (possibly another model's memory)."""
        main, enc_out = self.initial_queries(enc)
        main_preds, groups, maps, slices, next_ref = self.decode(enc, main, query_groups, return_attention)
        taps = dict(taps or {})
        taps.update(
            memory=enc["memory"],
            memory_mask=enc["memory_mask"],
            spatial_shapes=enc["spatial_shapes"],
            level_start_index=enc["level_start_index"],
            valid_ratios=enc["valid_ratios"],
            queries=QueryGroup("queries", main.content, main.reference, main.position),
            next_reference=next_ref,
            group_slices=slices,
        )
        if maps is not None:
            taps["decoder_self_attn"] = [m["self_attn"] for m in maps]
            taps["decoder_cross_attn"] = [
                {"sampling_locations": m["sampling_locations"], "attention_weights": m["attention_weights"]}
                for m in maps
            ]
        return DetectorOutputs(main=main_preds, groups=groups, enc=enc_out, taps=taps)

    def forward_outputs(
        self, images: ImageBatch, query_groups: Sequence[QueryGroup] = (), return_attention: bool = False
    ) -> DetectorOutputs:
        """Stage-wise predictions of the main group (``[L,B,Q,.]``), of each extra query group
        (``.groups[name]``), two-stage proposals (``.enc``) and the taps (backbone dict, neck maps and
        masks, memory, spatial shapes, level start index, valid ratios, memory mask, the model's own
        initial queries as a :class:`QueryGroup`, and with ``return_attention`` the per-layer decoder
        self-attention weights ``[B,M,Qt,Qt]`` and cross-attention sampling locations/weights over all
        groups; ``group_slices`` gives each group's query range)."""
        enc, taps = self.encode_images(images)
        return self.decode_memory(enc, query_groups, return_attention, taps)

    # ---------------------------------------------------------------------------------------
    # Training / inference entry point
    # ---------------------------------------------------------------------------------------
    def forward(self, batched_inputs: Sequence[Dict[str, Any]]):
        """Training: dict of weighted losses (detrex names). Eval: per image ``{"boxes" xyxy in the
        ``(height, width)`` frame, "scores", "labels"}``."""
        images = self.preprocess(batched_inputs)
        outputs = self.forward_outputs(images)
        if self.training:
            if self.criterion is None:
                raise RuntimeError("DeformableDETR was built without a criterion; it cannot compute losses")
            targets = self.prepare_targets(batched_inputs)
            return self.criterion.weight_losses(self.criterion(outputs, targets))
        detections = self.inference(outputs, images.image_sizes)
        output_sizes = [(x.get("height", s[0]), x.get("width", s[1])) for x, s in zip(batched_inputs, images.image_sizes)]
        return self.postprocess(detections, images.image_sizes, output_sizes)

    def inference(self, outputs: DetectorOutputs, image_sizes: Sequence[Tuple[int, int]]) -> List[Dict[str, Tensor]]:
        """Top-k detections of the final stage, xyxy pixels of the network input (before rescaling)."""
        return select_topk(outputs.main.logits[-1], outputs.main.boxes[-1], image_sizes,
                           self.select_box_nums_for_evaluation)

    @staticmethod
    def postprocess(detections, image_sizes, output_sizes) -> List[Dict[str, Tensor]]:
        """Rescale to ``output_sizes`` (height, width), clip, drop empty boxes."""
        out = []
        for det, size, (oh, ow) in zip(detections, image_sizes, output_sizes):
            det = detector_postprocess(det, size, int(oh), int(ow))
            out.append({"boxes": det["boxes"], "scores": det["scores"], "labels": det["labels"]})
        return out

    def parity_intermediates(self, outputs: DetectorOutputs) -> Dict[str, Any]:
        """Our tensors in the layout of a detrex parity fixture's ``intermediates.pt``."""
        taps = outputs.taps
        main = outputs.main
        if self.with_box_refine:  # each layer's output box is the next layer's reference
            refs_after = main.boxes.detach()
        else:
            refs_after = main.references
        enc = outputs.enc
        return {
            "backbone": taps["backbone"],
            "neck": taps["neck"],
            "masks": taps["neck_masks"],
            "transformer_outputs": (
                main.hidden,
                main.references[0],
                refs_after,
                enc["pred_logits"] if enc else None,
                enc["pred_boxes_unact"] if enc else None,
            ),
        }

    # ---------------------------------------------------------------------------------------
    # detrex compatibility
    # ---------------------------------------------------------------------------------------
    @classmethod
    def from_detrex_config(cls, cfg: Mapping[str, Any]) -> "DeformableDETR":
        """Build from a detrex LazyConfig dict (a parity fixture's ``reduced_config``, resolved)."""
        return cls(**_parse_detrex_config(cfg))

    @staticmethod
    def detrex_key_map(keys: Sequence[str]) -> Dict[str, str]:
        """``{detrex key: our key}``; aliases of a shared tensor map to the key that holds it."""
        keys = list(keys)
        refine = any(k.startswith("transformer.decoder.bbox_embed.") for k in keys)
        return {k: _detrex_to_ours(k, refine) or _alias_target(k, refine) for k in keys}

    @classmethod
    def convert_detrex_state_dict(cls, state_dict: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        """Rename a detrex Deformable DETR state dict to ours; aliases of shared tensors (the shared
        heads without box refinement, ``transformer.decoder.{class,bbox}_embed``) collapse to one
        entry, after checking that they really hold the same values."""
        keys = list(state_dict.keys())
        refine = any(k.startswith("transformer.decoder.bbox_embed.") for k in keys)
        out: Dict[str, Tensor] = {}
        aliases = []
        for key in keys:
            new = _detrex_to_ours(key, refine)
            if new is None:
                aliases.append(key)
            else:
                out[new] = state_dict[key]
        for key in aliases:
            target = _alias_target(key, refine)
            kept = out.get(target)
            value = state_dict[key]
            if kept is None:
                raise KeyError(f"detrex key {key!r} aliases {target!r}, which the checkpoint does not hold")
            if kept.shape != value.shape or not torch.equal(kept, value):
                raise ValueError(
                    f"detrex key {key!r} should hold the same tensor as {target!r} (shared between stages) "
                    "but its values differ; was the checkpoint made with a different with_box_refine?"
                )
        return out


_ENC_LAYER = re.compile(r"^transformer\.encoder\.layers\.(\d+)\.(.*)$")
_DEC_LAYER = re.compile(r"^transformer\.decoder\.layers\.(\d+)\.(.*)$")
_HEAD = re.compile(r"^(class_embed|bbox_embed)\.(\d+)\.(.*)$")
_FFN = {"ffns.0.layers.0.0.": "ffn.linear1.", "ffns.0.layers.1.": "ffn.linear2."}


def _rename_layer_part(rest: str, table: Dict[str, str]) -> str:
    for old, new in list(table.items()) + list(_FFN.items()):
        if rest.startswith(old):
            return new + rest[len(old):]
    raise KeyError(rest)


def _detrex_to_ours(key: str, refine: bool) -> Optional[str]:
    if key.startswith("backbone."):
        return next(iter(convert_detectron2_resnet_keys({key: None})))
    m = _ENC_LAYER.match(key)
    if m:
        table = {"attentions.0.": "self_attn.", "norms.0.": "norm1.", "norms.1.": "norm2."}
        return f"transformer.encoder.layers.{m.group(1)}." + _rename_layer_part(m.group(2), table)
    m = _DEC_LAYER.match(key)
    if m:
        table = {"attentions.0.attn.": "self_attn.", "attentions.1.": "cross_attn.",
                 "norms.0.": "norm1.", "norms.1.": "norm2.", "norms.2.": "norm3."}
        return f"transformer.decoder.layers.{m.group(1)}." + _rename_layer_part(m.group(2), table)
    if key.startswith("transformer.encoder.post_norm_layer."):
        return "transformer.encoder.norm." + key[len("transformer.encoder.post_norm_layer."):]
    if key.startswith(("transformer.decoder.bbox_embed.", "transformer.decoder.class_embed.")):
        return None
    m = _HEAD.match(key)
    if m and not refine:
        return f"{m.group(1)}.0.{m.group(3)}" if m.group(2) == "0" else None
    return key


def _alias_target(key: str, refine: bool) -> str:
    """Our key holding the tensor that the dropped detrex alias ``key`` duplicates."""
    if key.startswith("transformer.decoder."):
        key = key[len("transformer.decoder."):]
    m = _HEAD.match(key)
    if m is None:
        raise KeyError(key)
    return key if refine else f"{m.group(1)}.0.{m.group(3)}"


# ============================================================================================
# detrex config -> constructor arguments
# ============================================================================================


def _target(node: Mapping[str, Any]) -> str:
    return str(node.get("_target_", ""))


def _build_backbone(cfg: Mapping[str, Any]) -> ResNet:
    target = _target(cfg)
    if "stages" in cfg:  # detectron2 ResNet(stem=BasicStem, stages=make_default_stages(depth, ...))
        stages = cfg["stages"]
        if stages.get("stride_in_1x1", False):
            raise ValueError("detectron2 ResNet with stride_in_1x1=True (MSRA weights) is not supported; "
                             "torchvision-style ResNets put the stride on the 3x3 conv")
        if stages.get("norm", "FrozenBN") != "FrozenBN":
            raise ValueError(f"only FrozenBN backbones are supported, got norm={stages.get('norm')!r}")
        depth = int(stages["depth"])
    elif "depth" in cfg:  # detrex ResNet / our ResNet
        depth = int(cfg["depth"])
    else:
        raise ValueError(f"cannot build a backbone from config with _target_ {target!r}")
    return ResNet(depth=depth, out_features=tuple(cfg.get("out_features", ("res3", "res4", "res5"))),
                  freeze_at=int(cfg.get("freeze_at", 1)))


def _build_neck(cfg: Mapping[str, Any]) -> ChannelMapper:
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


def _build_position_embedding(cfg: Mapping[str, Any]) -> PositionEmbeddingSine:
    kwargs = {k: cfg[k] for k in ("num_pos_feats", "temperature", "normalize", "scale", "eps", "offset") if k in cfg}
    return PositionEmbeddingSine(**kwargs)


_LAYER_ARGS = ("embed_dim", "num_heads", "feedforward_dim", "attn_dropout", "ffn_dropout", "num_layers",
               "num_feature_levels")


def _build_transformer(cfg: Mapping[str, Any]) -> DeformableTransformer:
    enc_cfg, dec_cfg = cfg["encoder"], cfg["decoder"]
    encoder = DeformableTransformerEncoder(**{k: enc_cfg[k] for k in _LAYER_ARGS if k in enc_cfg},
                                           post_norm=bool(enc_cfg.get("post_norm", False)))
    decoder = DeformableTransformerDecoder(**{k: dec_cfg[k] for k in _LAYER_ARGS if k in dec_cfg},
                                           return_intermediate=bool(dec_cfg.get("return_intermediate", True)))
    return DeformableTransformer(
        encoder, decoder,
        as_two_stage=bool(cfg.get("as_two_stage", False)),
        num_feature_levels=int(cfg.get("num_feature_levels", 4)),
        two_stage_num_proposals=int(cfg.get("two_stage_num_proposals", 300)),
    )


def _build_criterion(cfg: Optional[Mapping[str, Any]], two_stage: bool) -> Optional[SetCriterion]:
    if not cfg:
        return None
    if cfg.get("loss_class_type", "focal_loss") != "focal_loss":
        raise ValueError(f"only the focal classification loss is supported, got {cfg.get('loss_class_type')!r}")
    m = cfg.get("matcher") or {}
    if m.get("cost_class_type", "focal_loss_cost") != "focal_loss_cost":
        raise ValueError(f"only the focal matching cost is supported, got {m.get('cost_class_type')!r}")
    matcher = HungarianMatcher(
        cost_class=float(m.get("cost_class", 2.0)), cost_bbox=float(m.get("cost_bbox", 5.0)),
        cost_giou=float(m.get("cost_giou", 2.0)), alpha=float(m.get("alpha", 0.25)), gamma=float(m.get("gamma", 2.0)),
    )
    # detrex's DeformableCriterion supervises two-stage proposals as a single class
    binary = bool(cfg.get("two_stage_binary_cls", "DeformableCriterion" in _target(cfg)))
    return SetCriterion(
        num_classes=int(cfg["num_classes"]), matcher=matcher, weight_dict=dict(cfg.get("weight_dict", {})),
        alpha=float(cfg.get("alpha", 0.25)), gamma=float(cfg.get("gamma", 2.0)), two_stage_binary_cls=binary,
    )


def _parse_detrex_config(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    two_stage = bool(cfg.get("as_two_stage", False))
    return dict(
        backbone=_build_backbone(cfg["backbone"]),
        position_embedding=_build_position_embedding(cfg["position_embedding"]),
        neck=_build_neck(cfg["neck"]),
        transformer=_build_transformer(cfg["transformer"]),
        num_classes=int(cfg["num_classes"]),
        num_queries=int(cfg["num_queries"]),
        criterion=_build_criterion(cfg.get("criterion"), two_stage),
        pixel_mean=list(cfg.get("pixel_mean", (123.675, 116.280, 103.530))),
        pixel_std=list(cfg.get("pixel_std", (58.395, 57.120, 57.375))),
        embed_dim=int(cfg.get("embed_dim", 256)),
        aux_loss=bool(cfg.get("aux_loss", True)),
        with_box_refine=bool(cfg.get("with_box_refine", False)),
        as_two_stage=two_stage,
        select_box_nums_for_evaluation=int(cfg.get("select_box_nums_for_evaluation", 100)),
        device=cfg.get("device"),
    )
