"""DAB-DETR: DETR with dynamic anchor boxes as queries (Liu et al., ICLR 2022), as in detrex.

Reads top to bottom as the paper's pipeline::

    images -> ResNet (res5 only) -> 1x1 input_proj -> sine position embedding (temperature 20)
           -> encoder (6 x [self-attn with query_scale-modulated positions, PReLU FFN])
           -> decoder (6 x [conditional self-attn, conditional cross-attn, PReLU FFN]) whose
              queries are zero content vectors plus 4-d anchor boxes (cx, cy, w, h), refined by the
              shared box head after every layer
           -> shared class head / box MLP on the LayerNorm-ed output of every layer.

The numerics follow detrex (IDEA-Research/detrex, ``projects/dab_detr``) exactly, including the
order of operations and the initialisation; the module tree is arranged for reading and
:mod:`tprd.checkpoint.detrex.dab_detr` maps detrex checkpoint keys onto it.

Things worth knowing:

* The decoder refines anchors with the box head applied to the *raw* layer output, while the
  returned per-stage boxes apply the same head to the *LayerNorm-ed* output (``post_norm_layer``):
  stage-l box = sigmoid(inverse_sigmoid(reference_l) + bbox_embed(hidden_l)). The reference of
  layer l+1 is the (detached) refined box of layer l; the stacked ``references`` keep the
  non-detached values, so the box loss of stage l+1 also trains layer l, as in detrex.
* ``freeze_anchor_box_centers``: detrex initialises the anchor centres uniformly in (0, 1) (through
  inverse sigmoid) and then tries to freeze them with ``weight.data[:, :2].requires_grad = False``,
  which does nothing (it sets the flag on a temporary view). We reproduce the *effective*
  behaviour: the flag only selects that initialisation and the whole anchor table stays trainable
  (docs/methods.md#diff-22).
* Padding masks: the encoder masks padded memory tokens. detrex never passes the padding mask to
  the decoder's cross-attention (its ``DabDetrTransformer`` calls the decoder without it), so
  checkpoints were trained attending to padded tokens; ``mask_decoder_memory=False`` (default)
  keeps that, ``True`` also masks them there (then a padded image gives the same detections as the
  image alone, up to the backbone's border effects). detrex's eval forward uses an all-zero mask;
  we always use the true mask (identical for a single image).
* Inputs, inference and the train/eval ``forward`` come from
  :class:`~tprd.modeling.detector.DETRDetector`.
* Extra query groups (:class:`~tprd.modeling.outputs.QueryGroup`: content ``[B?,Q,D]`` + anchors
  ``[B?,Q,4]`` normalised, i.e. after sigmoid) are decoded in the same pass as the main group,
  behind a block-diagonal self-attention mask, and returned split by name.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from tprd.layers.activation_checkpoint import run_layer, set_layer_options
from tprd.layers.box_ops import inverse_sigmoid
from tprd.layers.conditional_attention import ConditionalCrossAttention, ConditionalSelfAttention
from tprd.layers.mlp import MLP
from tprd.layers.position_embedding import get_sine_pos_embed
from tprd.modeling.detector import (
    PIXEL_MEAN,
    PIXEL_STD,
    DETRDetector,
    attention_taps,
    block_diagonal_mask,
    focal_prior_bias,
    group_slices,
    level_masks,
)
from tprd.modeling.outputs import DetectorOutputs, ImageBatch, QueryGroup, StagePredictions

__all__ = [
    "DABDETR",
    "DabDetrTransformer",
    "DabDetrTransformerEncoder",
    "DabDetrTransformerDecoder",
    "FFN",
]


# ------------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------------
class FFN(nn.Module):
    """``x + Dropout(Linear2(Dropout(act(Linear1(x)))))`` (residual included, as detrex's FFN)."""

    def __init__(self, embed_dim: int, feedforward_dim: int, activation: nn.Module, dropout: float = 0.0):
        super().__init__()
        self.linear1 = nn.Linear(embed_dim, feedforward_dim)
        self.activation = copy.deepcopy(activation)
        self.dropout1 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(feedforward_dim, embed_dim)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.dropout2(self.linear2(self.dropout1(self.activation(self.linear1(x)))))


def _default_activation() -> nn.Module:
    return nn.PReLU()


class DabDetrEncoderLayer(nn.Module):
    """Post-norm encoder layer: ``x = norm1(x + MHA(x+p, x+p, x)); x = norm2(FFN(x))``."""

    def __init__(self, embed_dim, num_heads, feedforward_dim, attn_dropout, ffn_dropout, activation):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(embed_dim, num_heads, dropout=attn_dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(embed_dim)
        self.ffn = FFN(embed_dim, feedforward_dim, activation, ffn_dropout)
        self.norm2 = nn.LayerNorm(embed_dim)

    def forward(self, x: Tensor, pos: Tensor, key_padding_mask: Optional[Tensor]) -> Tensor:
        qk = x + pos
        x = x + self.self_attn(qk, qk, x, key_padding_mask=key_padding_mask, need_weights=False)[0]
        x = self.norm1(x)
        return self.norm2(self.ffn(x))


class DabDetrTransformerEncoder(nn.Module):
    """Encoder whose position embedding is rescaled per layer by ``query_scale(x)`` (an MLP).

    ``forward(x [B,S,D], pos [B,S,D], key_padding_mask [B,S] bool)`` -> memory ``[B,S,D]``.
    """

    def __init__(self, embed_dim: int = 256, num_heads: int = 8, attn_dropout: float = 0.0, feedforward_dim: int = 2048,
                 ffn_dropout: float = 0.0, activation: Optional[nn.Module] = None, num_layers: int = 6,
                 post_norm: bool = False):
        super().__init__()
        activation = activation if activation is not None else _default_activation()
        self.embed_dim = embed_dim
        self.num_layers = num_layers
        self.layers = nn.ModuleList(
            DabDetrEncoderLayer(embed_dim, num_heads, feedforward_dim, attn_dropout, ffn_dropout, activation)
            for _ in range(num_layers)
        )
        self.query_scale = MLP(embed_dim, embed_dim, embed_dim, 2)
        self.post_norm_layer = nn.LayerNorm(embed_dim) if post_norm else None
        self.use_checkpoint = False  # activation checkpointing of each layer (set by the detector)

    def forward(self, x: Tensor, pos: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        for layer in self.layers:
            x = run_layer(layer, x, pos * self.query_scale(x), key_padding_mask, use_checkpoint=self.use_checkpoint)
        if self.post_norm_layer is not None:
            x = self.post_norm_layer(x)
        return x


class DabDetrDecoderLayer(nn.Module):
    """Post-norm decoder layer: conditional self-attn -> norm1 -> conditional cross-attn -> norm2
    -> FFN -> norm3 (each attention includes its residual)."""

    def __init__(self, embed_dim, num_heads, feedforward_dim, attn_dropout, ffn_dropout, activation, first: bool):
        super().__init__()
        self.self_attn = ConditionalSelfAttention(embed_dim, num_heads, attn_drop=attn_dropout)
        self.norm1 = nn.LayerNorm(embed_dim)
        self.cross_attn = ConditionalCrossAttention(embed_dim, num_heads, attn_drop=attn_dropout, use_query_pos=first)
        self.norm2 = nn.LayerNorm(embed_dim)
        self.ffn = FFN(embed_dim, feedforward_dim, activation, ffn_dropout)
        self.norm3 = nn.LayerNorm(embed_dim)

    def forward(self, query, query_pos, query_sine_embed, memory, memory_pos, self_attn_mask, memory_mask,
                return_attention: bool = False):
        """Returns the layer output ``[B,Q,D]``, and with ``return_attention`` also
        ``{"self_attn" [B,M,Q,Q], "cross_attn" [B,M,Q,S]}`` (softmax weights before dropout)."""
        query = self.self_attn(query, query_pos, attn_mask=self_attn_mask, need_weights=return_attention)
        if return_attention:
            query, self_weights = query
        query = self.norm1(query)
        query = self.cross_attn(query, memory, memory_pos, query_pos, query_sine_embed, key_padding_mask=memory_mask,
                                need_weights=return_attention)
        if return_attention:
            query, cross_weights = query
        query = self.norm3(self.ffn(self.norm2(query)))
        if return_attention:
            return query, {"self_attn": self_weights, "cross_attn": cross_weights}
        return query


class DabDetrTransformerDecoder(nn.Module):
    """Decoder over 4-d anchor boxes, refined after every layer by a box head passed to forward.

    Per layer, with the current anchors ``a = (cx, cy, w, h)`` (normalised):
    ``sine = sine_embed(a)`` (512-d, y before x), ``query_pos = ref_point_head(sine)``;
    ``sine_xy = sine[:, :256] * (1 if first layer else query_scale(query))``; with
    ``modulate_hw_attn`` the x-half is multiplied by ``sigmoid(ref_anchor_head(query))[0] / w`` and
    the y-half by ``[1] / h``; then the layer runs, and the anchors become
    ``sigmoid(bbox_embed(query) + inverse_sigmoid(a))``.
    """

    def __init__(self, embed_dim: int = 256, num_heads: int = 8, attn_dropout: float = 0.0, feedforward_dim: int = 2048,
                 ffn_dropout: float = 0.0, activation: Optional[nn.Module] = None, num_layers: int = 6,
                 modulate_hw_attn: bool = True, post_norm: bool = True, query_dim: int = 4):
        super().__init__()
        if query_dim != 4:
            raise ValueError("DAB-DETR decoder supports 4-d anchor boxes only (query_dim=4)")
        if not post_norm:
            raise ValueError("DAB-DETR decoder requires post_norm=True (the heads read LayerNorm-ed states)")
        activation = activation if activation is not None else _default_activation()
        self.embed_dim = embed_dim
        self.num_layers = num_layers
        self.layers = nn.ModuleList(
            DabDetrDecoderLayer(
                embed_dim, num_heads, feedforward_dim, attn_dropout, ffn_dropout, activation, first=(i == 0)
            )
            for i in range(num_layers)
        )
        self.query_scale = MLP(embed_dim, embed_dim, embed_dim, 2)
        self.ref_point_head = MLP(query_dim // 2 * embed_dim, embed_dim, embed_dim, 2)
        self.modulate_hw_attn = modulate_hw_attn
        self.ref_anchor_head = MLP(embed_dim, embed_dim, 2, 2) if modulate_hw_attn else None
        self.post_norm_layer = nn.LayerNorm(embed_dim)
        self.use_checkpoint = False  # activation checkpointing of each layer (set by the detector)

    def _query_sine_embed(self, query: Tensor, anchors: Tensor, first: bool) -> Tuple[Tensor, Tensor]:
        # [B,Q,4*D/2]: pos(cy), pos(cx), pos(w), pos(h) (D/2 = 128 in every DAB-DETR config)
        sine = get_sine_pos_embed(anchors, num_pos_feats=self.embed_dim // 2)
        query_pos = self.ref_point_head(sine)
        sine = sine[..., : self.embed_dim]
        if not first:
            sine = sine * self.query_scale(query)
        if self.modulate_hw_attn:
            ref_hw = self.ref_anchor_head(query).sigmoid()
            half = self.embed_dim // 2
            sine_y = sine[..., :half] * (ref_hw[..., 1] / anchors[..., 3]).unsqueeze(-1)
            sine_x = sine[..., half:] * (ref_hw[..., 0] / anchors[..., 2]).unsqueeze(-1)
            sine = torch.cat([sine_y, sine_x], dim=-1)
        return query_pos, sine

    def forward(
        self,
        query: Tensor,
        anchors: Tensor,
        memory: Tensor,
        memory_pos: Tensor,
        bbox_embed: nn.Module,
        self_attn_mask: Optional[Tensor] = None,
        memory_mask: Optional[Tensor] = None,
        return_attention: bool = False,
    ):
        """``query [B,Q,D]`` content, ``anchors [B,Q,4]`` normalised boxes, ``memory``/``memory_pos``
        ``[B,S,D]``, ``self_attn_mask [Q,Q]`` bool (True = blocked), ``memory_mask [B,S]`` bool
        (True = padding; ``None`` attends to every token).

        Returns ``hidden [L,B,Q,D]`` (after ``post_norm_layer``) and ``references [L,B,Q,4]``, the
        anchors each layer received (index 0 = the input anchors); with ``return_attention`` also the
        per-layer maps ``[{"self_attn" [B,M,Q,Q], "cross_attn" [B,M,Q,S]}]``.
        """
        maps: List[Dict[str, Tensor]] = []
        hidden: List[Tensor] = []
        references: List[Tensor] = [anchors]
        for idx, layer in enumerate(self.layers):
            query_pos, sine = self._query_sine_embed(query, anchors, first=(idx == 0))
            query = run_layer(layer, query, query_pos, sine, memory, memory_pos, self_attn_mask, memory_mask,
                              return_attention, use_checkpoint=self.use_checkpoint)
            if return_attention:
                query, layer_maps = query
                maps.append(layer_maps)
            refined = (bbox_embed(query) + inverse_sigmoid(anchors)).sigmoid()
            if idx < self.num_layers - 1:
                references.append(refined)
            anchors = refined.detach()
            hidden.append(self.post_norm_layer(query))
        if return_attention:
            return torch.stack(hidden), torch.stack(references), maps
        return torch.stack(hidden), torch.stack(references)


class DabDetrTransformer(nn.Module):
    """Encoder + anchor decoder; ``init_weights`` applies Xavier-uniform to every matrix in both."""

    def __init__(self, encoder: DabDetrTransformerEncoder, decoder: DabDetrTransformerDecoder):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.embed_dim = encoder.embed_dim
        self.init_weights()

    def init_weights(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)


# ------------------------------------------------------------------------------------------------
# Detector
# ------------------------------------------------------------------------------------------------
class DABDETR(DETRDetector):
    """DAB-DETR detector.

    ``model(batched_inputs)``: in training the dict of *weighted* detrex-named losses
    (``loss_class``, ``loss_bbox``, ``loss_giou``, ``loss_class_0`` ...); in eval a list of
    ``{"boxes" xyxy in the (height, width) frame, "scores", "labels"}``.

    ``batched_inputs``: list of dicts ``image`` ``[3,H,W]`` RGB 0..255, ``height``/``width`` (output
    size), ``gt_boxes`` ``[G,4]`` xyxy pixels of ``image``, ``gt_classes`` ``[G]`` (training; required).

    ``use_checkpoint``: activation checkpointing of every encoder and decoder layer (exact; less
    memory, one more forward per layer in backward).
    """

    family = "dab_detr"
    query_kind = "anchor"
    require_gt = True

    def __init__(
        self,
        backbone: nn.Module,
        transformer: DabDetrTransformer,
        position_embedding: nn.Module,
        num_classes: int,
        num_queries: int = 300,
        criterion: Optional[nn.Module] = None,
        in_features: Sequence[str] = ("res5",),
        in_channels: int = 2048,
        embed_dim: int = 256,
        aux_loss: bool = True,
        pixel_mean: Sequence[float] = PIXEL_MEAN,
        pixel_std: Sequence[float] = PIXEL_STD,
        freeze_anchor_box_centers: bool = True,
        select_box_nums_for_evaluation: int = 300,
        mask_decoder_memory: bool = False,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        self.backbone = backbone
        self.in_features = list(in_features)
        self.input_proj = nn.Conv2d(in_channels, embed_dim, kernel_size=1)
        self.position_embedding = position_embedding
        self.transformer = transformer
        self.anchor_box_embed = nn.Embedding(num_queries, 4)
        self.class_embed = nn.Linear(embed_dim, num_classes)
        self.bbox_embed = MLP(embed_dim, embed_dim, 4, 3)
        self.criterion = criterion
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.embed_dim = embed_dim
        self.aux_loss = aux_loss
        self.freeze_anchor_box_centers = freeze_anchor_box_centers
        self.select_box_nums_for_evaluation = select_box_nums_for_evaluation
        self.mask_decoder_memory = mask_decoder_memory
        self.register_pixel_stats(pixel_mean, pixel_std)
        set_layer_options(self, use_checkpoint)
        self.init_weights()

    def init_weights(self) -> None:
        """detrex's init of the parts outside the transformer (which Xavier-initialises itself)."""
        if self.freeze_anchor_box_centers:
            # Centres uniform in (0, 1) through inverse sigmoid; (w, h) keep N(0, 1). The reference
            # also "freezes" the centres, which has no effect: they stay trainable (see module doc).
            with torch.no_grad():
                w = self.anchor_box_embed.weight
                w[:, :2] = inverse_sigmoid(torch.rand_like(w[:, :2]))
        nn.init.constant_(self.class_embed.bias, focal_prior_bias(0.01))
        nn.init.constant_(self.bbox_embed.layers[-1].weight, 0.0)
        nn.init.constant_(self.bbox_embed.layers[-1].bias, 0.0)

    # --------------------------------------------------------------------------------------------
    # Inputs: preprocess (normalise, zero-pad -> ImageBatch [B,3,H,W] + mask [B,H,W]) and
    # prepare_targets (labels [G], normalised cxcywh boxes [G,4]) come from DETRDetector.
    # --------------------------------------------------------------------------------------------

    # --------------------------------------------------------------------------------------------
    # Stages
    # --------------------------------------------------------------------------------------------
    @property
    def num_stages(self) -> int:
        return self.transformer.decoder.num_layers

    @property
    def num_feature_levels(self) -> int:
        """One: the encoder reads the single ``input_proj`` map of the last backbone level."""
        return 1

    def extract_features(self, images: ImageBatch):
        """Backbone dict, the one "neck" level (``[input_proj [B,D,h,w]]``) and its padding mask
        (``[[B,h,w]]``): what feature-only distillation needs of a teacher (no transformer)."""
        feats = self.backbone(images.tensor)
        x = self.input_proj(feats[self.in_features[-1]])
        mask = level_masks(images.mask, images.image_sizes, [tuple(x.shape[-2:])], "nearest")[0]
        return feats, [x], [mask]

    def encode(self, images: ImageBatch) -> Dict[str, Any]:
        """Backbone -> input_proj -> position embedding -> encoder.

        Returns ``backbone`` (dict of ``[B,C,h,w]``), ``neck`` (``[input_proj [B,D,h,w]]``),
        ``neck_masks`` (``[[B,h,w]]``), ``memory`` ``[B,S,D]``, ``memory_pos`` ``[B,S,D]``,
        ``memory_mask`` ``[B,S]`` (True = padding), ``spatial_shapes`` ``[1,2]``.
        """
        feats, (x,), (mask,) = self.extract_features(images)
        B, D, h, w = x.shape
        pos = self.position_embedding(mask)
        src = x.flatten(2).transpose(1, 2)
        pos_flat = pos.flatten(2).transpose(1, 2)
        mask_flat = mask.flatten(1)
        memory = self.transformer.encoder(src, pos_flat, key_padding_mask=mask_flat)
        return {
            "backbone": feats,
            "neck": [x],
            "neck_masks": [mask],
            "memory": memory,
            "memory_pos": pos_flat,
            "memory_mask": mask_flat,
            "spatial_shapes": torch.tensor([[h, w]], device=x.device),
        }

    def initial_anchors(self) -> Tensor:
        """The model's own anchor table as normalised boxes ``[Q,4]`` (sigmoid of the embedding)."""
        return self.anchor_box_embed.weight.sigmoid()

    def decode(
        self,
        memory: Tensor,
        memory_pos: Tensor,
        memory_mask: Optional[Tensor] = None,
        query_groups: Sequence[QueryGroup] = (),
        return_attention: bool = False,
    ):
        """Decode the main anchors plus ``query_groups`` in one pass (block-diagonal self-attention).

        Returns the main group's :class:`StagePredictions`, a dict of the groups' by name, the
        query range of every group (``{"main": slice, name: slice}``) and the per-layer attention
        maps (``None`` unless ``return_attention``).
        """
        B = memory.shape[0]
        D = self.embed_dim
        contents = [memory.new_zeros(B, self.num_queries, D)]
        anchors = [self.initial_anchors().unsqueeze(0).expand(B, -1, -1)]
        for g in query_groups:
            if g.position is not None:
                raise ValueError(f"query group {g.name!r}: DAB-DETR queries have no positional part")
            ref = g.reference if g.reference.dim() == 3 else g.reference.unsqueeze(0)
            if ref.shape[-1] != 4:
                raise ValueError(f"query group {g.name!r}: DAB-DETR needs 4-d anchor boxes, got {tuple(ref.shape)}")
            con = g.require_content("DAB-DETR")
            con = con if con.dim() == 3 else con.unsqueeze(0)
            Q = ref.shape[1]
            anchors.append(ref.to(memory.dtype).expand(B, Q, 4))
            contents.append(con.to(memory.dtype).expand(B, Q, D))
        sizes = [a.shape[1] for a in anchors]
        self_attn_mask = block_diagonal_mask(sizes, memory.device) if len(sizes) > 1 else None
        decoded = self.transformer.decoder(
            torch.cat(contents, dim=1),
            torch.cat(anchors, dim=1),
            memory,
            memory_pos,
            self.bbox_embed,
            self_attn_mask=self_attn_mask,
            memory_mask=memory_mask if self.mask_decoder_memory else None,
            return_attention=return_attention,
        )
        hidden, references = decoded[:2]
        maps = decoded[2] if return_attention else None
        logits = self.class_embed(hidden)
        boxes = (inverse_sigmoid(references) + self.bbox_embed(hidden)).sigmoid()
        preds = []
        for h_, r_, l_, b_ in zip(*(t.split(sizes, dim=2) for t in (hidden, references, logits, boxes))):
            preds.append(StagePredictions(logits=l_, boxes=b_, hidden=h_, references=r_))
        slices = group_slices(["main"] + [g.name for g in query_groups], sizes)
        return preds[0], {g.name: p for g, p in zip(query_groups, preds[1:])}, slices, maps

    def encode_images(self, images: ImageBatch) -> Tuple[Dict[str, Tensor], Dict[str, Any]]:
        """Backbone, input projection and encoder (the same entry point as the multi-scale
        detectors): the encoder state ``{memory [B,S,D], memory_pos [B,S,D], memory_mask [B,S],
        spatial_shapes [1,2]}`` and the feature taps (``backbone``, ``neck``, ``neck_masks``,
        ``image_sizes``, ``padded_size``)."""
        out = self.encode(images)
        enc = {k: out[k] for k in ("memory", "memory_pos", "memory_mask", "spatial_shapes")}
        taps = {k: out[k] for k in ("backbone", "neck", "neck_masks")}
        taps.update(image_sizes=list(images.image_sizes), padded_size=tuple(images.tensor.shape[-2:]))
        return enc, taps

    def decode_memory(self, enc: Dict[str, Tensor], query_groups: Sequence[QueryGroup] = (), *,
                      targets: Optional[Sequence[Dict[str, Tensor]]] = None, return_attention: bool = False,
                      taps: Optional[Dict[str, Any]] = None) -> DetectorOutputs:
        """Anchors, conditional decoder and heads on an encoder state (possibly another model's
        memory, e.g. CrossKD's student memory through the teacher); ``targets`` are not used.

        Stacked per-stage predictions ``[L,B,Q,·]`` of the main group, the extra groups by name, and
        the taps (with those of :meth:`encode_images`: ``backbone``, ``neck``, ``neck_masks``,
        ``memory``, ``memory_pos``, ``memory_mask``, ``spatial_shapes``, ``queries`` = anchor table
        as normalised boxes ``[Q,4]``, ``image_sizes``, ``padded_size``, ``group_slices``; with
        ``return_attention`` the per-layer ``decoder_self_attn`` ``[B,M,T,T]`` and dense
        ``decoder_cross_attn`` ``{"kind": "dense", "attention_weights" [B,M,T,S]}``)."""
        names = [g.name for g in query_groups]
        if len(set(names)) != len(names):
            raise ValueError(f"query group names must be unique, got {names}")
        main, groups, slices, maps = self.decode(enc["memory"], enc["memory_pos"], enc.get("memory_mask"),
                                                 query_groups, return_attention)
        taps = dict(taps or {})
        taps.update(enc)
        taps["queries"] = self.initial_anchors()
        taps["group_slices"] = slices
        taps.update(attention_taps(maps))
        return DetectorOutputs(main=main, groups=groups, taps=taps)

    # forward_outputs (encode_images, then decode_memory) comes from DETRDetector.

    # --------------------------------------------------------------------------------------------
    # Training / inference: forward, inference and postprocess come from DETRDetector
    # --------------------------------------------------------------------------------------------
    def compute_losses(self, outputs: DetectorOutputs, targets: Sequence[Dict[str, Tensor]]) -> Dict[str, Tensor]:
        """Weighted GT losses (detrex names); without ``aux_loss`` only the final stage is supervised."""
        if not self.aux_loss:
            m = outputs.main
            outputs = StagePredictions(m.logits[-1:], m.boxes[-1:], m.hidden[-1:], m.references[-1:])
        return super().compute_losses(outputs, targets)
