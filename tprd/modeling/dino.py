"""DINO (Zhang et al., ICLR 2023): DETR with improved denoising anchor boxes, 4-scale, as in detrex.

The model reads top to bottom as the paper does::

    images --backbone--> res3..res5 --ChannelMapper--> 4 maps [B,256,H_l,W_l] (+ padding masks)
           --sine position + level embedding, flatten--> tokens [B,S,256]
           --deformable encoder--> memory [B,S,256]
           --two-stage query selection: one proposal per token, scored by the encoder head
             (class_embed[L] / bbox_embed[L]); the top-Q by max class logit give the references
             (their boxes, detached) and the learned content table tgt_embed [Q,256] the content
             ("mixed query selection")
           --(training) contrastive denoising queries prepended: noised GT labels/boxes, positive
             and negative groups, behind an attention mask
           --decoder: L x [self-attn, deformable cross-attn, FFN]; query positions are an MLP of the
             sine embedding of the current reference box; each layer refines the box with its own
             head (look forward twice)--> hidden [L,B,Q,256] (after the decoder's LayerNorm)
           --per-layer heads: class Linear, box MLP (+ inverse-sigmoid reference)
             --> logits [L,B,Q,C], boxes [L,B,Q,4]

Numerics follow detrex (``projects/dino``, IDEA-Research/detrex) operation by operation; module names
are those of :mod:`tprd.modeling.deformable_detr` (whose encoder and decoder layer DINO reuses,
because the numerics are identical); its adapter (:mod:`tprd.checkpoint.detrex.dino`) maps detrex
checkpoint keys onto them. Inputs, the backbone -> neck ->
encoder front end, proposal generation, inference and the train/eval ``forward`` are shared with
Deformable DETR (:class:`~tprd.modeling.detector.MultiScaleDETRDetector`).

Things worth knowing (all as in detrex):

* The decoder refines its reference with ``bbox_embed[l]`` applied to the *raw* layer output, while
  the returned stage-l box applies the same head to the *LayerNorm-ed* output:
  ``box_l = sigmoid(bbox_embed[l](hidden_l) + inverse_sigmoid(reference_l))``. The reference of
  layer l+1 is layer l's refined box, detached; ``references[l+1]`` keeps it *un*-detached, so the
  box loss of stage l+1 also trains the box head of layer l ("look forward twice").
* The query position is computed from the reference scaled by the valid ratios (padded-frame
  coordinates), so a padded image's predictions depend on the padding a little even with exact
  masks; the unpadded images of a batch are unaffected.
* The encoder proposals ("enc") are the Q selected tokens: logits ``class_embed[L](selected memory)``
  and boxes ``sigmoid(bbox_embed[L](memory) + proposal)``; they are supervised with the real labels.
* Padding masks are correct in eval as well (detrex's eval forward uses an all-zero mask, identical
  for a single image).

Beyond detrex: :meth:`DINO.forward_outputs` decodes extra :class:`~tprd.modeling.outputs.QueryGroup`
s (content ``[B?,Q,D]`` + 4-d reference boxes, normalised, used as given) in the same decoder pass
behind a block-diagonal self-attention mask combined with the denoising mask, returns stacked
per-stage predictions, the denoising predictions apart (``.dn``) and the taps distillation methods
use; denoising can be switched off per call (``use_dn=False``, the distillation teacher).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..layers.activation_checkpoint import run_layer
from ..layers.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, inverse_sigmoid
from ..layers.mlp import MLP
from ..layers.position_embedding import get_sine_pos_embed
from .criterion import SetCriterion, get_num_boxes
from .deformable_detr import (
    DeformableDecoderLayer,
    DeformableTransformerEncoder,
    EncoderDecoderTransformer,
    reset_deformable_parameters,
)
from .detector import (
    PIXEL_MEAN,
    PIXEL_STD,
    MultiScaleDETRDetector,
    block_diagonal_mask,
    check_mask_mode,
    focal_prior_bias,
    group_slices,
    reset_neck_parameters,
)
from .outputs import DetectorOutputs, ImageBatch, QueryGroup, StagePredictions

__all__ = [
    "DINO",
    "DINOCriterion",
    "DINOTransformer",
    "DINOTransformerEncoder",
    "DINOTransformerDecoder",
]

# DINO's encoder is Deformable DETR's (post-norm deformable self-attention + FFN), with FFN 2048 and
# no dropout in the official configs.
DINOTransformerEncoder = DeformableTransformerEncoder


# ============================================================================================
# Transformer
# ============================================================================================


class DINOTransformerDecoder(nn.Module):
    """``num_layers`` deformable decoder layers with box-conditioned query positions (detrex
    ``DINOTransformerDecoder`` arguments).

    Query position of layer l: ``ref_point_head(sine(reference_l * valid_ratios))``, an MLP of the
    sine embedding (``embed_dim / 2`` = 128 per coordinate, y/x swapped) of the 4-d reference. ``norm`` is applied to
    every layer's output before the heads. ``return_intermediate`` is accepted for config
    compatibility; every stage is always returned.
    """

    def __init__(self, embed_dim: int = 256, num_heads: int = 8, feedforward_dim: int = 1024, attn_dropout: float = 0.1,
                 ffn_dropout: float = 0.1, num_layers: int = 6, return_intermediate: bool = True,
                 num_feature_levels: int = 4, look_forward_twice: bool = True, num_points: int = 4):
        super().__init__()
        self.embed_dim = embed_dim
        self.num_layers = num_layers
        self.look_forward_twice = look_forward_twice
        self.layers = nn.ModuleList(
            DeformableDecoderLayer(embed_dim, num_heads, feedforward_dim, attn_dropout, ffn_dropout,
                                   num_feature_levels, num_points)
            for _ in range(num_layers)
        )
        self.ref_point_head = MLP(2 * embed_dim, embed_dim, embed_dim, 2)
        self.norm = nn.LayerNorm(embed_dim)
        self.use_checkpoint = False  # activation checkpointing of each layer (set by the detector)

    def forward(
        self,
        tgt: Tensor,
        reference: Tensor,
        memory: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        valid_ratios: Tensor,
        memory_padding_mask: Optional[Tensor],
        bbox_embed: Sequence[nn.Module],
        self_attn_mask: Optional[Tensor] = None,
        return_attention: bool = False,
    ):
        """Decode content ``tgt [B,Q,D]`` from normalised reference boxes ``reference [B,Q,4]``.

        ``bbox_embed``: the per-layer box heads (layer l refines with ``bbox_embed[l]``).
        Returns ``hidden [L,B,Q,D]`` (after ``norm``), ``refined [L,B,Q,4]`` (layer l's refined box,
        not detached when ``look_forward_twice``; layer l+1 received it detached) and the per-layer
        attention maps (``None`` unless ``return_attention``).
        """
        output = tgt
        hidden, refined, maps = [], [], []
        for lid, layer in enumerate(self.layers):
            ref_input = reference[:, :, None] * torch.cat([valid_ratios, valid_ratios], -1)[:, None]
            sine = get_sine_pos_embed(ref_input[:, :, 0, :], num_pos_feats=self.embed_dim // 2)
            query_pos = self.ref_point_head(sine)
            output, layer_maps = run_layer(layer, output, query_pos, ref_input, memory, spatial_shapes,
                                           level_start_index, memory_padding_mask, self_attn_mask, return_attention,
                                           use_checkpoint=self.use_checkpoint)
            new_reference = (bbox_embed[lid](output) + inverse_sigmoid(reference)).sigmoid()
            reference = new_reference.detach()
            hidden.append(self.norm(output))
            refined.append(new_reference if self.look_forward_twice else reference)
            maps.append(layer_maps)
        return torch.stack(hidden), torch.stack(refined), (maps if return_attention else None)


class DINOTransformer(EncoderDecoderTransformer):
    """Encoder + decoder + level embeddings + the two-stage query-selection parameters.

    ``enc_output`` (+ ``enc_output_norm``) turns the memory into proposal features; ``tgt_embed``
    ``[two_stage_num_proposals, D]`` is the learned content of the selected queries
    (``learnt_init_query``; otherwise the selected proposal features, detached).
    """

    def __init__(
        self,
        encoder: DeformableTransformerEncoder,
        decoder: DINOTransformerDecoder,
        num_feature_levels: int = 4,
        two_stage_num_proposals: int = 900,
        learnt_init_query: bool = True,
    ):
        super().__init__(encoder, decoder, num_feature_levels, two_stage_num_proposals)
        self.learnt_init_query = learnt_init_query
        if learnt_init_query:
            self.tgt_embed = nn.Embedding(two_stage_num_proposals, self.embed_dim)
        self.enc_output = nn.Linear(self.embed_dim, self.embed_dim)
        self.enc_output_norm = nn.LayerNorm(self.embed_dim)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """detrex init: Xavier-uniform for every matrix, deformable-attention init, N(0,1) level
        embeddings."""
        reset_deformable_parameters(self)
        nn.init.normal_(self.level_embeds)

    # valid_ratio and gen_encoder_output_proposals: as Deformable DETR (EncoderDecoderTransformer).


# ============================================================================================
# Criterion
# ============================================================================================


class DINOCriterion(SetCriterion):
    """:class:`~tprd.modeling.criterion.SetCriterion` (matched focal / L1 / GIoU losses of every
    decoder stage and of the encoder proposals, ``_enc``) plus the denoising losses (``_dn``).

    Denoising queries need no matching: positive query ``j`` of group ``g`` reconstructs GT ``j`` of
    its image; negative and padding queries are background. The dn terms are normalised by
    ``num_boxes * dn_num``. Without denoising queries (``dn_number=0``, no GT in the batch, or dn off)
    the dn keys are present as constant zeros, as in detrex. Returns UNWEIGHTED losses, in detrex's
    order: main stages, ``_enc``, then the dn terms.
    """

    def forward(self, outputs, targets: Sequence[Dict[str, Tensor]], return_indices: bool = False):
        result = super().forward(outputs, targets, return_indices=return_indices)
        losses, indices = result if return_indices else (result, None)
        dn = outputs.dn if isinstance(outputs, DetectorOutputs) else None
        if isinstance(outputs, DetectorOutputs):
            num_stages = outputs.main.logits.shape[0]
            device = outputs.main.logits.device
        else:
            num_stages, device = 1, None
        losses.update(self.dn_losses(dn, targets, num_stages if self.aux_loss else 1, device))
        return (losses, indices) if return_indices else losses

    def dn_losses(self, dn: Optional[Dict[str, Any]], targets, num_stages: int, device=None) -> Dict[str, Tensor]:
        """``loss_{class,bbox,giou}_dn`` (final stage) and ``_dn_l`` (stage ``l < L-1``)."""
        losses: Dict[str, Tensor] = {}
        if not dn:
            for l in [num_stages - 1] + list(range(num_stages - 1)):
                s = "" if l == num_stages - 1 else f"_{l}"
                for name in ("loss_bbox_dn", "loss_giou_dn", "loss_class_dn"):
                    losses[name + s] = torch.as_tensor(0.0, device=device)
            return losses
        preds: StagePredictions = dn["predictions"]
        logits, boxes = preds.logits, preds.boxes
        if logits.shape[0] != num_stages:
            logits, boxes = logits[-num_stages:], boxes[-num_stages:]
        num_groups, single_padding = int(dn["dn_num"]), int(dn["single_padding"])
        per_image = []
        for t in targets:
            n = int(t["labels"].shape[0])
            gt = torch.arange(n, dtype=torch.int64)
            src = (torch.arange(num_groups, dtype=torch.int64) * single_padding)[:, None] + gt[None]
            per_image.append((src.flatten(), gt.repeat(num_groups)))
        indices = [per_image] * num_stages
        num_boxes = get_num_boxes(targets, logits.device) * num_groups
        cls = self.loss_labels(logits, targets, indices, num_boxes)
        box = self.loss_boxes(boxes, targets, indices, num_boxes)
        for l in [num_stages - 1] + list(range(num_stages - 1)):
            s = "_dn" if l == num_stages - 1 else f"_dn_{l}"
            losses["loss_class" + s] = cls[l]
            losses["loss_bbox" + s] = box["loss_bbox"][l]
            losses["loss_giou" + s] = box["loss_giou"][l]
        return losses


# ============================================================================================
# The detector
# ============================================================================================


class DINO(MultiScaleDETRDetector):
    """DINO with detrex's constructor arguments.

    Args:
        backbone: returns a dict of feature maps (e.g. :class:`~tprd.modeling.backbone.ResNet`).
        position_embedding: :class:`~tprd.layers.position_embedding.PositionEmbeddingSine`.
        neck: maps the backbone dict to a list of ``num_feature_levels`` maps of ``embed_dim``.
        transformer: :class:`DINOTransformer`; its ``two_stage_num_proposals`` must equal
            ``num_queries``.
        embed_dim, num_classes, num_queries: width, foreground classes (sigmoid heads, no
            background), selected queries.
        criterion: :class:`DINOCriterion` (training only).
        pixel_mean, pixel_std: RGB normalisation of 0..255 inputs.
        aux_loss: supervise every decoder stage (else the final one only).
        select_box_nums_for_evaluation: top-k detections kept per image.
        dn_number: denoising queries per kind (positive/negative); the number of groups is
            ``dn_number // max GT count`` (at least 1); 0 turns denoising off.
        label_noise_ratio: a dn label is replaced by a random class with probability half of this.
        box_noise_scale: dn box corners move by up to this times half the box size (positives less
            than that, negatives between 1x and 2x).
        mask_mode: per-level padding masks, ``"nearest"`` (detrex) or ``"exact"``
            (see :func:`~tprd.modeling.deformable_detr.level_masks`).
        use_checkpoint: activation checkpointing of every encoder and decoder layer (exact).
        msda_backend: deformable-attention backend of every MSDA module (``None``: process-wide).
        device: where to put the model (``None``: leave it).
        input_format, vis_period: accepted for detrex config compatibility (RGB input; no
            training-time visualisation).
    """

    family = "dino"
    query_kind = "content_box"

    def __init__(
        self,
        backbone: nn.Module,
        position_embedding: nn.Module,
        neck: nn.Module,
        transformer: DINOTransformer,
        embed_dim: int = 256,
        num_classes: int = 80,
        num_queries: int = 900,
        criterion: Optional[DINOCriterion] = None,
        pixel_mean: Sequence[float] = PIXEL_MEAN,
        pixel_std: Sequence[float] = PIXEL_STD,
        aux_loss: bool = True,
        select_box_nums_for_evaluation: int = 300,
        dn_number: int = 100,
        label_noise_ratio: float = 0.5,
        box_noise_scale: float = 1.0,
        mask_mode: str = "nearest",
        use_checkpoint: bool = False,
        msda_backend: Optional[str] = None,
        device: Optional[str] = None,
        input_format: Optional[str] = "RGB",
        vis_period: int = 0,
    ):
        super().__init__()
        if transformer.two_stage_num_proposals != num_queries:
            raise ValueError(
                f"num_queries={num_queries} but transformer.two_stage_num_proposals="
                f"{transformer.two_stage_num_proposals}: DINO selects exactly num_queries proposals; set "
                "model.transformer.two_stage_num_proposals='${..num_queries}'"
            )
        check_mask_mode(mask_mode)
        if input_format not in (None, "RGB"):
            raise ValueError(f"input_format={input_format!r}: images are expected as RGB 0..255")
        self.backbone = backbone
        self.position_embedding = position_embedding
        self.neck = neck
        self.transformer = transformer
        self.embed_dim = embed_dim
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.aux_loss = aux_loss
        self.select_box_nums_for_evaluation = select_box_nums_for_evaluation
        self.dn_number = dn_number
        self.label_noise_ratio = label_noise_ratio
        self.box_noise_scale = box_noise_scale
        self.mask_mode = mask_mode
        self.criterion = criterion
        if criterion is not None:
            criterion.aux_loss = aux_loss
        # one class head and one box head per decoder layer, plus one for the encoder proposals
        num_pred = transformer.decoder.num_layers + 1
        self.class_embed = nn.ModuleList(nn.Linear(embed_dim, num_classes) for _ in range(num_pred))
        self.bbox_embed = nn.ModuleList(MLP(embed_dim, embed_dim, 4, 3) for _ in range(num_pred))
        # denoising: embedding of the (noised) GT labels
        self.label_enc = nn.Embedding(num_classes, embed_dim)
        self.finish_init(pixel_mean, pixel_std, use_checkpoint, msda_backend, device)

    @torch.no_grad()
    def reset_head_parameters(self) -> None:
        """detrex init: class bias -log(99) (prior 0.01); last box layer zero; neck convs
        Xavier-uniform with zero bias."""
        for head in self.class_embed:
            nn.init.constant_(head.bias, focal_prior_bias(0.01))
        for head in self.bbox_embed:
            nn.init.zeros_(head.layers[-1].weight)
            nn.init.zeros_(head.layers[-1].bias)
        reset_neck_parameters(self.neck)

    @property
    def num_stages(self) -> int:
        return self.transformer.decoder.num_layers

    # ---------------------------------------------------------------------------------------
    # Inputs -> backbone -> neck -> encoder: as Deformable DETR (MultiScaleDETRDetector):
    # preprocess, prepare_targets, extract_features (backbone dict, neck maps [B,D,H_l,W_l], masks
    # [B,H_l,W_l]) and encode (-> memory [B,S,D], memory_mask [B,S], pos [B,S,D], spatial_shapes
    # [L,2], level_start_index [L], valid_ratios [B,L,2]).
    # ---------------------------------------------------------------------------------------

    # ---------------------------------------------------------------------------------------
    # Queries: two-stage selection and contrastive denoising
    # ---------------------------------------------------------------------------------------
    def select_queries(self, enc: Dict[str, Tensor]) -> Tuple[QueryGroup, Dict[str, Tensor]]:
        """Mixed query selection: the main query group and the selected encoder proposals.

        Every memory token becomes a proposal scored by the encoder heads (``class_embed[L]``,
        ``bbox_embed[L]``); the ``num_queries`` tokens with the largest max-class logit are kept.
        Main group: content = ``tgt_embed`` ``[B,Q,D]``, reference = the selected boxes (detached)
        ``[B,Q,4]``. Proposals: ``{"pred_logits" [B,Q,C], "pred_boxes" [B,Q,4], "topk_indices"
        [B,Q], "hidden" [B,Q,D] (selected proposal features), "all_token_logits" [B,S,C]}``.
        """
        tr = self.transformer
        memory = enc["memory"]
        bsz, num_tokens, d = memory.shape
        if num_tokens < self.num_queries:
            raise ValueError(
                f"DINO selects num_queries={self.num_queries} encoder proposals but the feature maps of "
                f"this batch have only {num_tokens} tokens (spatial shapes {enc['spatial_shapes'].tolist()}); "
                "use larger images or fewer queries"
            )
        out_memory, proposals = tr.gen_encoder_output_proposals(memory, enc["memory_mask"], enc["spatial_shapes"])
        head = self.num_stages
        all_logits = self.class_embed[head](out_memory)
        coords_unact = self.bbox_embed[head](out_memory) + proposals
        topk = torch.topk(all_logits.max(-1)[0], self.num_queries, dim=1)[1]
        topk_coords_unact = torch.gather(coords_unact, 1, topk.unsqueeze(-1).repeat(1, 1, 4))
        reference = topk_coords_unact.detach().sigmoid()
        selected = torch.gather(out_memory, 1, topk.unsqueeze(-1).repeat(1, 1, d))
        if tr.learnt_init_query:
            content = tr.tgt_embed.weight[None].repeat(bsz, 1, 1)
        else:
            content = selected.detach()
        proposals_out = {
            "pred_logits": self.class_embed[head](selected),
            "pred_boxes": topk_coords_unact.sigmoid(),
            "topk_indices": topk,
            "hidden": selected,
            "all_token_logits": all_logits,
        }
        return QueryGroup("main", content, reference), proposals_out

    def prepare_for_cdn(self, targets: Sequence[Dict[str, Tensor]]) -> Optional[Dict[str, Any]]:
        """Contrastive denoising queries (detrex ``prepare_for_cdn``), or ``None`` without GT.

        With ``G`` the largest GT count in the batch there are ``dn_num = max(dn_number // G, 1)``
        groups of ``2G`` queries: slots ``[0, G)`` of a group are positives (GT ``j`` of the image at
        slot ``j``, box corners moved by less than half the box size), slots ``[G, 2G)`` negatives
        (moved by 1x-2x); unused slots have zero content and the box (0.5, 0.5, 0.5, 0.5). Labels are
        replaced by a random class with probability ``label_noise_ratio / 2``.

        Returns ``content [B,P,D]`` (label embeddings), ``reference [B,P,4]`` (noised boxes,
        normalised), ``attn_mask [P+Q, P+Q]`` (True = blocked: the matching queries do not see the
        dn queries, dn groups do not see each other), ``single_padding = 2G``, ``dn_num`` and
        ``pad_size = P = 2G * dn_num``.
        """
        if self.dn_number <= 0:
            return None
        sizes = [int(t["labels"].shape[0]) for t in targets]
        max_gt = max(sizes, default=0)
        if max_gt == 0:
            return None
        num_groups = max((2 * self.dn_number) // (2 * max_gt), 1)
        copies = 2 * num_groups  # a positive and a negative copy per group
        device = self.device
        labels = torch.cat([t["labels"] for t in targets]).to(device)
        boxes = torch.cat([t["boxes"] for t in targets]).to(device)
        batch_idx = torch.cat([torch.full((n,), b, dtype=torch.int64) for b, n in enumerate(sizes)]).to(device)
        total = labels.shape[0]

        known_labels = labels.repeat(copies)
        known_bid = batch_idx.repeat(copies)
        known_boxes = boxes.repeat(copies, 1)
        noisy_labels = known_labels.clone()
        if self.label_noise_ratio > 0:
            p = torch.rand_like(noisy_labels.float())
            chosen = torch.nonzero(p < (self.label_noise_ratio * 0.5)).view(-1)
            new_labels = torch.randint_like(chosen, 0, self.num_classes)
            noisy_labels.scatter_(0, chosen, new_labels)
        noisy_boxes = known_boxes
        if self.box_noise_scale > 0:
            corners = box_cxcywh_to_xyxy(known_boxes)
            half_wh = known_boxes[:, 2:] / 2
            diff = torch.cat([half_wh, half_wh], 1)
            rand_sign = torch.randint_like(known_boxes, low=0, high=2, dtype=torch.float32) * 2.0 - 1.0
            rand_part = torch.rand_like(known_boxes)
            negative = torch.arange(copies, device=device).view(-1, 1).repeat(1, total).flatten() % 2 == 1
            rand_part[negative] += 1.0
            rand_part *= rand_sign
            corners = (corners + torch.mul(rand_part, diff) * self.box_noise_scale).clamp(min=0.0, max=1.0)
            noisy_boxes = box_xyxy_to_cxcywh(corners)

        pad_size = 2 * max_gt * num_groups
        bsz = len(targets)
        content = torch.zeros(bsz, pad_size, self.embed_dim, device=device)
        reference_unact = torch.zeros(bsz, pad_size, 4, device=device)
        slot = torch.cat([torch.arange(n) for n in sizes]).to(device)
        slots = torch.cat([slot + max_gt * c for c in range(copies)])
        content[known_bid, slots] = self.label_enc(noisy_labels)
        reference_unact[known_bid, slots] = inverse_sigmoid(noisy_boxes)

        size = pad_size + self.num_queries
        attn_mask = torch.zeros(size, size, dtype=torch.bool, device=device)
        attn_mask[pad_size:, :pad_size] = True
        block = 2 * max_gt
        for g in range(num_groups):
            rows = slice(block * g, block * (g + 1))
            attn_mask[rows, block * (g + 1):pad_size] = True
            attn_mask[rows, :block * g] = True
        return {
            "content": content,
            "reference": reference_unact.sigmoid(),
            "attn_mask": attn_mask,
            "single_padding": block,
            "dn_num": num_groups,
            "pad_size": pad_size,
        }

    # ---------------------------------------------------------------------------------------
    # Decoder -> heads
    # ---------------------------------------------------------------------------------------
    def predict(self, hidden: Tensor, references: Tensor) -> Tuple[Tensor, Tensor]:
        """Per-layer heads: ``hidden [L,B,Q,D]``, the references the stages are predicted from
        ``[L,B,Q,4]`` -> logits ``[L,B,Q,C]``, boxes ``[L,B,Q,4]``."""
        logits, boxes = [], []
        for l in range(hidden.shape[0]):
            logits.append(self.class_embed[l](hidden[l]))
            boxes.append((self.bbox_embed[l](hidden[l]) + inverse_sigmoid(references[l])).sigmoid())
        return torch.stack(logits), torch.stack(boxes)

    @staticmethod
    def _group_tensors(group: QueryGroup, bsz: int, dim: int) -> Tuple[Tensor, Tensor]:
        if group.position is not None:
            raise ValueError(
                f"query group {group.name!r}: DINO derives query positions from the reference boxes; "
                "pass content and reference only (position=None)"
            )
        content, reference = group.require_content("DINO"), group.reference
        if reference is None or reference.shape[-1] != 4:
            raise ValueError(f"query group {group.name!r}: DINO needs 4-d reference boxes [B?,Q,4]")
        if content.dim() == 2:
            content = content.unsqueeze(0).expand(bsz, -1, -1)
        if reference.dim() == 2:
            reference = reference.unsqueeze(0).expand(bsz, -1, -1)
        if content.shape[-1] != dim or content.shape[:2] != reference.shape[:2]:
            raise ValueError(
                f"query group {group.name!r}: content {tuple(content.shape)} and reference "
                f"{tuple(reference.shape)} do not fit [B,Q,{dim}] / [B,Q,4] with B={bsz}"
            )
        return content, reference

    def decode(
        self,
        enc: Dict[str, Tensor],
        main: QueryGroup,
        query_groups: Sequence[QueryGroup] = (),
        dn: Optional[Dict[str, Any]] = None,
        return_attention: bool = False,
    ):
        """Decode [dn |] main | groups in one pass and apply the heads.

        Self-attention: the groups are block-diagonal (each sees only itself); inside the first
        block (dn + main) the denoising mask applies. Returns ``(main StagePredictions, {name:
        StagePredictions}, dn StagePredictions or None, attention maps or None, query slices,
        refined reference after the last layer of the main group)``.
        """
        memory = enc["memory"]
        bsz, d = memory.shape[0], self.embed_dim
        names = [main.name] + [g.name for g in query_groups]
        if len(set(names)) != len(names) or "dn" in names:
            raise ValueError(f"query group names must be unique and not 'dn', got {names}")
        parts = [(main.content, main.reference)] + [self._group_tensors(g, bsz, d) for g in query_groups]
        if dn is not None:
            parts.insert(0, (dn["content"], dn["reference"]))
            names.insert(0, "dn")
        sizes = [c.shape[1] for c, _ in parts]
        content = torch.cat([c.to(memory.dtype) for c, _ in parts], 1)
        reference = torch.cat([r.to(memory.dtype) for _, r in parts], 1)
        attn_mask = None
        first = sizes[0] + (sizes[1] if dn is not None else 0)  # dn and main share a block
        if len(sizes) > (2 if dn is not None else 1):
            block_of = [0, 0] + list(range(1, len(sizes) - 1)) if dn is not None else list(range(len(sizes)))
            attn_mask = block_diagonal_mask(sizes, memory.device, block_of)
        if dn is not None:
            if attn_mask is None:
                attn_mask = dn["attn_mask"]
            else:
                attn_mask[:first, :first] = dn["attn_mask"]
        hidden, refined, maps = self.transformer.decoder(
            content, reference, memory, enc["spatial_shapes"], enc["level_start_index"], enc["valid_ratios"],
            enc["memory_mask"], self.bbox_embed, self_attn_mask=attn_mask, return_attention=return_attention,
        )
        if self.training:
            # detrex: give the label embedding a (zero) gradient in every step, for DDP
            hidden = torch.cat([hidden[:1] + self.label_enc.weight[0, 0] * 0.0, hidden[1:]], 0)
        references = torch.cat([reference[None], refined[:-1]], 0)
        logits, boxes = self.predict(hidden, references)
        slices = group_slices(names, sizes)
        preds = {
            name: StagePredictions(logits[:, :, s], boxes[:, :, s], hidden[:, :, s], references[:, :, s])
            for name, s in slices.items()
        }
        main_preds = preds.pop(main.name)
        dn_preds = preds.pop("dn", None)
        return main_preds, preds, dn_preds, maps, slices, refined[-1][:, slices[main.name]]

    # ---------------------------------------------------------------------------------------
    # Full stage-wise forward
    # ---------------------------------------------------------------------------------------
    def encode_images(self, images: ImageBatch) -> Tuple[Dict[str, Tensor], Dict[str, Any]]:
        """Backbone, neck and encoder: the encoder state and the feature taps (``backbone``,
        ``neck``, ``neck_masks``, ``image_sizes``, ``padded_size``)."""
        enc, taps = super().encode_images(images)
        taps.update(image_sizes=list(images.image_sizes), padded_size=tuple(images.tensor.shape[-2:]))
        return enc, taps

    def decode_memory(self, enc: Dict[str, Tensor], query_groups: Sequence[QueryGroup] = (), *,
                      targets: Optional[Sequence[Dict[str, Tensor]]] = None, use_dn: Optional[bool] = None,
                      return_attention: bool = False, taps: Optional[Dict[str, Any]] = None) -> DetectorOutputs:
        """Query selection, (denoising,) decoder and heads on an encoder state (possibly another
        model's memory). ``use_dn``: ``None`` = in training, when targets are given and
        ``dn_number > 0``."""
        if use_dn is None:
            use_dn = self.training and targets is not None and self.dn_number > 0
        if use_dn and targets is None:
            raise ValueError("use_dn=True needs the targets (prepare_targets(batched_inputs))")
        main, proposals = self.select_queries(enc)
        dn = self.prepare_for_cdn(targets) if use_dn else None
        main_preds, groups, dn_preds, maps, slices, next_ref = self.decode(
            enc, main, query_groups, dn, return_attention
        )
        dn_out = None
        if dn is not None:
            dn_out = {
                "predictions": dn_preds,
                "single_padding": dn["single_padding"],
                "dn_num": dn["dn_num"],
                "pad_size": dn["pad_size"],
                "attn_mask": dn["attn_mask"],
            }
        taps = self.decoder_taps(
            enc, taps, QueryGroup("queries", main.content, main.reference), next_ref, slices, maps,
            keys=("memory", "memory_mask", "pos", "spatial_shapes", "level_start_index", "valid_ratios"))
        return DetectorOutputs(main=main_preds, groups=groups, enc=proposals, dn=dn_out, taps=taps)

    def forward_outputs(self, images: ImageBatch, query_groups: Sequence[QueryGroup] = (), *,
                        targets: Optional[Sequence[Dict[str, Tensor]]] = None, use_dn: Optional[bool] = None,
                        return_attention: bool = False) -> DetectorOutputs:
        """Stage-wise predictions of the main group (``[L,B,Q,.]``), of each extra query group
        (``.groups[name]``), the selected encoder proposals (``.enc``), the denoising predictions and
        meta data (``.dn``: ``predictions``, ``single_padding``, ``dn_num``, ``pad_size``,
        ``attn_mask``; only with denoising) and the taps: ``backbone``, ``neck``, ``neck_masks``,
        ``memory``, ``memory_mask``, ``pos``, ``spatial_shapes``, ``level_start_index``,
        ``valid_ratios``, ``queries`` (the main group's content ``tgt_embed`` ``[B,Q,D]`` and selected
        reference boxes ``[B,Q,4]`` as a :class:`QueryGroup`), ``next_reference``, ``group_slices``,
        ``image_sizes``, ``padded_size`` and with ``return_attention`` the per-layer decoder
        self-attention weights ``[B,M,T,T]`` and cross-attention sampling locations/weights over all
        ``T`` decoded queries."""
        enc, taps = self.encode_images(images)
        return self.decode_memory(enc, query_groups, targets=targets, use_dn=use_dn,
                                  return_attention=return_attention, taps=taps)

    def train_outputs(self, images: ImageBatch, targets: Sequence[Dict[str, Tensor]]) -> DetectorOutputs:
        """The training forward decodes the denoising queries of ``targets`` too."""
        return self.forward_outputs(images, targets=targets)

    # ---------------------------------------------------------------------------------------
    # Training / inference: forward (weighted losses incl. ``_enc`` and ``_dn`` terms in training,
    # detections in eval), compute_losses, inference and postprocess come from DETRDetector.
    # ---------------------------------------------------------------------------------------
