"""Deformable DETR (Zhu et al., ICLR 2021): plain, with iterative box refinement, and two-stage.

The model reads top to bottom as the paper does::

    images --backbone--> res3..res5 --neck--> 4 maps [B,256,H_l,W_l] (+ padding masks)
           --sine position + level embedding, flatten--> tokens [B,S,256]
           --deformable encoder--> memory [B,S,256]
           --queries: learned table (or top-k encoder proposals, two-stage)-->
           --decoder: self-attention + deformable cross-attention, L layers--> hidden [L,B,Q,256]
           --heads: class Linear, box MLP (+ inverse-sigmoid reference)--> logits [L,B,Q,C], boxes [L,B,Q,4]

Numerics follow detrex (``projects/deformable_detr``) operation by operation, so a detrex checkpoint
converted by its adapter (:mod:`tprd.checkpoint.detrex.deformable_detr`) gives the same outputs.
Module names are our own (``self_attn``, ``cross_attn``, ``ffn.linear1``, ``norm1`` ...). Heads
that detrex shares between stages (no box refinement) are stored once (``class_embed.0``,
``bbox_embed.0``).

Inputs (normalise + pad), the backbone -> neck -> encoder front end, proposal generation, inference
and the train/eval ``forward`` live in :mod:`tprd.modeling.detector` (shared with DINO).

Beyond detrex, :meth:`DeformableDETR.forward_outputs` decodes extra query groups in the same
decoder pass (block-diagonal self-attention mask), returns stacked per-stage predictions and the
intermediate tensors distillation methods tap, and the padding masks are correct in eval as well.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers.mlp import MLP
from ..layers.box_ops import inverse_sigmoid
from ..layers.activation_checkpoint import run_layer
from ..layers.lean_dropout import Dropout, ReLUDropout, lean_attention_saves
from ..layers.ms_deform_attn import MultiScaleDeformableAttention
from .criterion import SetCriterion
from .detector import (
    PIXEL_MEAN,
    PIXEL_STD,
    MultiScaleDETRDetector,
    block_diagonal_mask,
    check_mask_mode,
    multihead_attention_weights,
    encoder_output_proposals,
    focal_prior_bias,
    group_slices,
    images_to_batch,
    level_masks,
    reset_neck_parameters,
    valid_ratio,
)
from .outputs import DetectorOutputs, QueryGroup, StagePredictions

__all__ = [
    "DeformableDETR",
    "DeformableTransformer",
    "EncoderDecoderTransformer",
    "DeformableTransformerEncoder",
    "DeformableTransformerDecoder",
    "DeformableEncoderLayer",
    "DeformableDecoderLayer",
    "FFN",
    "reset_deformable_parameters",
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
        self.relu_dropout = ReLUDropout(dropout)  # relu + dropout keeping one tensor for backward
        self.dropout2 = Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout2(self.linear2(self.relu_dropout(self.linear1(x))))


class DeformableEncoderLayer(nn.Module):
    """Post-norm encoder layer: deformable self-attention over all levels, then FFN."""

    def __init__(self, embed_dim=256, num_heads=8, feedforward_dim=1024, attn_dropout=0.1, ffn_dropout=0.1,
                 num_levels=4, num_points=4):
        super().__init__()
        self.self_attn = MultiScaleDeformableAttention(embed_dim, num_heads, num_levels, num_points)
        self.dropout = Dropout(attn_dropout)
        self.norm1 = nn.LayerNorm(embed_dim)
        self.ffn = FFN(embed_dim, feedforward_dim, ffn_dropout)
        self.norm2 = nn.LayerNorm(embed_dim)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask,
                checkpoint_attention: bool = False):
        """``src``, ``pos`` ``[B,S,D]``; ``reference_points [B,S,L,2]``; ``padding_mask [B,S]``.
        ``checkpoint_attention``: recompute the attention block in backward (keeps its input only)."""
        src = run_layer(self.attention_block, src, pos, reference_points, spatial_shapes, level_start_index,
                        padding_mask, use_checkpoint=checkpoint_attention)
        return self.norm2(src + self.ffn(src))

    def attention_block(self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask):
        """``norm1(src + dropout(self_attn(src)))``."""
        attn = self.self_attn(src, src, reference_points, spatial_shapes, level_start_index,
                              query_pos=pos, value_padding_mask=padding_mask)
        return self.norm1(src + self.dropout(attn))


class DeformableDecoderLayer(nn.Module):
    """Post-norm decoder layer: query self-attention, deformable cross-attention into the memory, FFN."""

    def __init__(self, embed_dim=256, num_heads=8, feedforward_dim=1024, attn_dropout=0.1, ffn_dropout=0.1,
                 num_levels=4, num_points=4):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(embed_dim, num_heads, dropout=attn_dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(embed_dim)
        self.cross_attn = MultiScaleDeformableAttention(embed_dim, num_heads, num_levels, num_points)
        self.dropout = Dropout(attn_dropout)
        self.norm2 = nn.LayerNorm(embed_dim)
        self.ffn = FFN(embed_dim, feedforward_dim, ffn_dropout)
        self.norm3 = nn.LayerNorm(embed_dim)

    def forward(self, tgt, query_pos, reference_points, memory, spatial_shapes, level_start_index,
                memory_padding_mask, self_attn_mask=None, return_attention=False):
        """``tgt``, ``query_pos`` ``[B,Q,D]``; ``reference_points [B,Q,L,2|4]`` (already scaled by the
        valid ratios); ``memory [B,S,D]``. Returns ``(tgt, attention)`` where ``attention`` is ``None``
        or ``{"self_attn" [B,M,Q,Q] (softmax before dropout), "sampling_locations" [B,Q,M,L,P,2],
        "attention_weights" [B,Q,M,L,P]}``; the outputs are the same with or without maps."""
        q = k = tgt + query_pos
        with lean_attention_saves():  # its dropout's noise kept as a byte mask (exact, CPU training)
            attn = self.self_attn(q, k, tgt, attn_mask=self_attn_mask, need_weights=False)[0]
        self_weights = multihead_attention_weights(self.self_attn, q, k, self_attn_mask) if return_attention else None
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

    CHECKPOINT_PARTS = ("attention",)  # use_checkpoint="encoder_attention" recomputes attention blocks only

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
        # Activation checkpointing (set by the detector): each layer (True), or each layer's
        # attention block only ("attention": most of the memory cut for a small share of the recompute).
        self.use_checkpoint = False

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
        attention_only = self.use_checkpoint == "attention"
        for layer in self.layers:
            src = run_layer(layer, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask,
                            attention_only, use_checkpoint=self.use_checkpoint is True)
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
        self.use_checkpoint = False  # activation checkpointing of each layer (set by the detector)

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
            tgt, layer_maps = run_layer(layer, tgt, query_pos, ref_input, memory, spatial_shapes, level_start_index,
                                        memory_padding_mask, self_attn_mask, return_attention,
                                        use_checkpoint=self.use_checkpoint)
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


@torch.no_grad()
def reset_deformable_parameters(module: nn.Module) -> None:
    """detrex transformer init: Xavier-uniform for every matrix of ``module``, then the
    deformable-attention init of each :class:`MultiScaleDeformableAttention` in it."""
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)
    for m in module.modules():
        if isinstance(m, MultiScaleDeformableAttention):
            m.reset_parameters()


class EncoderDecoderTransformer(nn.Module):
    """What the transformers of Deformable DETR and DINO share: ``encoder``, ``decoder``, the
    per-level embeddings ``level_embeds [L,D]``, the valid ratio of a level's mask and the projection
    of the encoder proposals (``enc_output`` + ``enc_output_norm``, registered by the subclass)."""

    def __init__(self, encoder: DeformableTransformerEncoder, decoder: nn.Module, num_feature_levels: int,
                 two_stage_num_proposals: int):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.num_feature_levels = num_feature_levels
        self.two_stage_num_proposals = two_stage_num_proposals
        self.embed_dim = encoder.embed_dim
        self.level_embeds = nn.Parameter(torch.empty(num_feature_levels, self.embed_dim))

    # The valid fraction of each level (``[B,2]`` (w, h) of a mask ``[B,H,W]``).
    valid_ratio = staticmethod(valid_ratio)

    def gen_encoder_output_proposals(self, memory: Tensor, padding_mask: Tensor, spatial_shapes: Tensor):
        """One proposal per valid token: cell centre, size 0.05 * 2^level (un-sigmoided ``[B,S,4]``,
        ``inf`` on padding and near the border) and the projected memory
        ``enc_output_norm(enc_output(memory))`` ``[B,S,D]`` (zeroed memory there)."""
        out, proposals = encoder_output_proposals(memory, padding_mask, spatial_shapes)
        return self.enc_output_norm(self.enc_output(out)), proposals


class DeformableTransformer(EncoderDecoderTransformer):
    """Encoder + decoder + level embeddings + the query initialisation parameters.

    Single-stage: ``reference_points`` Linear(D -> 2) maps the positional half of a query to its
    2-d reference. Two-stage: ``enc_output`` (+ ``enc_output_norm``) turns memory into proposals and
    ``pos_trans`` (+ ``pos_trans_norm``) embeds the selected proposal boxes into queries.
    """

    def __init__(self, encoder: DeformableTransformerEncoder, decoder: DeformableTransformerDecoder,
                 as_two_stage: bool = False, num_feature_levels: int = 4, two_stage_num_proposals: int = 300):
        super().__init__(encoder, decoder, num_feature_levels, two_stage_num_proposals)
        self.as_two_stage = as_two_stage
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
        reset_deformable_parameters(self)
        if not self.as_two_stage:
            nn.init.xavier_normal_(self.reference_points.weight, gain=1.0)
            nn.init.zeros_(self.reference_points.bias)
        nn.init.normal_(self.level_embeds)

    @staticmethod
    def proposal_pos_embed(proposals: Tensor, num_pos_feats: int = 128, temperature: float = 10000) -> Tensor:
        """Sine embedding of un-sigmoided boxes ``[B,Q,4]`` -> ``[B,Q,4*num_pos_feats]``."""
        dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=proposals.device)
        dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
        pos = (proposals.sigmoid() * (2 * math.pi))[:, :, :, None] / dim_t
        return torch.stack((pos[:, :, :, 0::2].sin(), pos[:, :, :, 1::2].cos()), dim=4).flatten(2)


# ============================================================================================
# The detector
# ============================================================================================


class DeformableDETR(MultiScaleDETRDetector):
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
        use_checkpoint: activation checkpointing of every encoder and decoder layer (True), or of the
            ``"encoder"``'s or ``"decoder"``'s layers only (exact; less
            memory, one more forward per layer in backward).
        msda_backend: deformable-attention backend of every MSDA module (``None``: the process-wide
            one, ``"auto"`` by default; see :mod:`tprd.layers.ms_deform_attn`).
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
        pixel_mean: Sequence[float] = PIXEL_MEAN,
        pixel_std: Sequence[float] = PIXEL_STD,
        embed_dim: int = 256,
        aux_loss: bool = True,
        with_box_refine: bool = False,
        as_two_stage: bool = False,
        select_box_nums_for_evaluation: int = 100,
        mask_mode: str = "nearest",
        use_checkpoint: bool = False,
        msda_backend: Optional[str] = None,
        device: Optional[str] = None,
    ):
        super().__init__()
        if transformer.as_two_stage != as_two_stage:
            raise ValueError(
                f"as_two_stage={as_two_stage} but transformer.as_two_stage={transformer.as_two_stage}; "
                "set both (model.as_two_stage and model.transformer.as_two_stage) to the same value"
            )
        check_mask_mode(mask_mode)
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
        self.finish_init(pixel_mean, pixel_std, use_checkpoint, msda_backend, device)

    @torch.no_grad()
    def reset_head_parameters(self) -> None:
        """detrex init: class bias -log(99) (prior 0.01); last box layer zero; per-stage heads (box
        refinement) identical copies; box size bias -2 on the first box head only (0 in two-stage);
        neck convs Xavier-uniform with zero bias."""
        nn.init.constant_(self.class_embed[0].bias, focal_prior_bias(0.01))
        nn.init.zeros_(self.bbox_embed[0].layers[-1].weight)
        nn.init.zeros_(self.bbox_embed[0].layers[-1].bias)
        for heads in (self.class_embed, self.bbox_embed):  # per-stage heads start as copies (detrex)
            for head in heads[1:]:
                head.load_state_dict(heads[0].state_dict())
        if not self.as_two_stage:
            self.bbox_embed[0].layers[-1].bias[2:] = -2.0
        reset_neck_parameters(self.neck)

    family = "deformable_detr"

    @property
    def query_kind(self) -> str:
        return "proposal" if self.as_two_stage else "position"

    @property
    def num_stages(self) -> int:
        return self.transformer.decoder.num_layers

    def _heads(self, stage: int) -> Tuple[nn.Module, nn.Module]:
        i = stage if self.with_box_refine else 0
        return self.class_embed[i], self.bbox_embed[i]

    # ---------------------------------------------------------------------------------------
    # Inputs -> backbone -> neck -> encoder: shared with DINO (MultiScaleDETRDetector):
    # preprocess, prepare_targets, extract_features (backbone dict, neck maps [B,D,H_l,W_l], masks
    # [B,H_l,W_l]) and encode (-> memory [B,S,D], memory_mask [B,S], pos, spatial_shapes [L,2],
    # level_start_index [L], valid_ratios [B,L,2]).
    # ---------------------------------------------------------------------------------------

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
        content, position, reference = group.require_content("Deformable DETR"), group.position, group.reference
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
        attn_mask = block_diagonal_mask(sizes, content.device) if len(groups) > 1 else None
        hidden, references, next_ref, maps = self.transformer.decoder(
            content, position, reference, enc["memory"], enc["spatial_shapes"], enc["level_start_index"],
            enc["valid_ratios"], enc["memory_mask"], self_attn_mask=attn_mask,
            bbox_embed=self.bbox_embed if self.with_box_refine else None, return_attention=return_attention,
        )
        logits, boxes = self.predict(hidden, references)
        slices = group_slices(names, sizes)
        preds = {
            name: StagePredictions(logits[:, :, s], boxes[:, :, s], hidden[:, :, s], _slice_queries(references, s))
            for name, s in slices.items()
        }
        main_preds = preds.pop(main.name)
        return main_preds, preds, maps, slices, next_ref[:, slices[main.name]]

    # ---------------------------------------------------------------------------------------
    # Full stage-wise forward
    # ---------------------------------------------------------------------------------------
    def decode_memory(self, enc: Dict[str, Tensor], query_groups: Sequence[QueryGroup] = (), *,
                      targets: Optional[Sequence[Dict[str, Tensor]]] = None, return_attention: bool = False,
                      taps: Optional[Dict[str, Any]] = None) -> DetectorOutputs:
        """Queries, decoder and heads on an encoder state (possibly another model's memory);
        ``targets`` are not used (no denoising).

        Stage-wise predictions of the main group (``[L,B,Q,.]``), of each extra query group
        (``.groups[name]``), two-stage proposals (``.enc``) and the taps (with those of
        :meth:`forward_outputs`: backbone dict, neck maps and masks, memory, spatial shapes, level
        start index, valid ratios, memory mask, the model's own initial queries as a
        :class:`QueryGroup`, and with ``return_attention`` the per-layer decoder self-attention
        weights ``[B,M,Qt,Qt]`` and cross-attention sampling locations/weights over all groups;
        ``group_slices`` gives each group's query range)."""
        main, enc_out = self.initial_queries(enc)
        main_preds, groups, maps, slices, next_ref = self.decode(enc, main, query_groups, return_attention)
        queries = QueryGroup("queries", main.content, main.reference, main.position)
        taps = self.decoder_taps(enc, taps, queries, next_ref, slices, maps)
        return DetectorOutputs(main=main_preds, groups=groups, enc=enc_out, taps=taps)

    # forward_outputs (encode_images, then decode_memory) comes from DETRDetector.

    # ---------------------------------------------------------------------------------------
    # Training / inference: forward, compute_losses, inference and postprocess come from
    # DETRDetector (weighted detrex losses in training; top-k detections rescaled in eval).
    # ---------------------------------------------------------------------------------------
