"""What the three detectors (Deformable DETR, DINO, DAB-DETR) share.

* :class:`DETRDetector`: pixel normalisation buffers, ``device``, ``preprocess`` (normalise + pad ->
  :class:`~tprd.modeling.outputs.ImageBatch`), ``prepare_targets``, ``inference`` / ``postprocess``
  (:mod:`tprd.modeling.postprocess`), ``forward_outputs`` (each detector's ``encode_images`` then
  its ``decode_memory``) and the ``forward`` train/eval dispatch on top of ``forward_outputs`` and
  ``compute_losses``.
* :class:`MultiScaleDETRDetector`: backbone -> neck -> per-level padding masks -> sine + level
  embeddings -> flattened tokens -> deformable encoder, for Deformable DETR and DINO, built on the
  standalone functions :func:`level_masks`, :func:`flatten_levels`, :func:`valid_ratio` and
  :func:`encoder_output_proposals`.
* Small helpers for decoding several query groups in one pass (:func:`block_diagonal_mask`,
  :func:`group_slices`, :func:`attention_taps`) and the detrex head / neck initialisation.

Everything here is numerically identical to the per-detector code it replaces.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers.activation_checkpoint import set_layer_options
from ..layers.box_ops import box_xyxy_to_cxcywh
from .outputs import DetectorOutputs, ImageBatch, QueryGroup, StagePredictions
from .postprocess import detector_postprocess, select_topk

__all__ = [
    "DETRDetector",
    "MultiScaleDETRDetector",
    "images_to_batch",
    "level_masks",
    "flatten_levels",
    "valid_ratio",
    "encoder_output_proposals",
    "block_diagonal_mask",
    "group_slices",
    "attention_taps",
    "multihead_attention_weights",
    "focal_prior_bias",
    "reset_neck_parameters",
]

PIXEL_MEAN = (123.675, 116.280, 103.530)
PIXEL_STD = (58.395, 57.120, 57.375)


# ============================================================================================
# Images -> padded batch -> per-level padding masks
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
    """Padding mask ``[B,H_l,W_l]`` of every feature level (``True`` = padding).

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


def check_mask_mode(mask_mode: str) -> None:
    if mask_mode not in ("nearest", "exact"):
        raise ValueError(f"mask_mode must be 'nearest' or 'exact', got {mask_mode!r}")


# ============================================================================================
# Multi-scale encoder inputs (Deformable DETR, DINO)
# ============================================================================================


def valid_ratio(mask: Tensor) -> Tensor:
    """``[B,2]`` (w, h) fraction of valid cells along the first row/column of ``mask [B,H,W]``."""
    _, h, w = mask.shape
    valid_h = torch.sum(~mask[:, :, 0], 1)
    valid_w = torch.sum(~mask[:, 0, :], 1)
    return torch.stack([valid_w.float() / w, valid_h.float() / h], -1)


def flatten_levels(feats: Sequence[Tensor], masks: Sequence[Tensor], position_embedding: nn.Module,
                   level_embeds: Tensor) -> Dict[str, Tensor]:
    """Flatten ``L`` maps ``[B,D,H_l,W_l]`` (+ masks ``[B,H_l,W_l]``) into one token sequence.

    Returns ``src [B,S,D]``, ``pos [B,S,D]`` (sine embedding of the mask + the level's embedding),
    ``memory_mask [B,S]`` (True = padding), ``spatial_shapes [L,2]``, ``level_start_index [L]`` and
    ``valid_ratios [B,L,2]``, with ``S = sum_l H_l * W_l``.
    """
    src, pos, mask_flat, shapes = [], [], [], []
    for lvl, (feat, mask) in enumerate(zip(feats, masks)):
        shapes.append(tuple(feat.shape[-2:]))
        pos_l = position_embedding(mask).flatten(2).transpose(1, 2)
        pos.append(pos_l + level_embeds[lvl].view(1, 1, -1))
        src.append(feat.flatten(2).transpose(1, 2))
        mask_flat.append(mask.flatten(1))
    src, pos, mask_flat = torch.cat(src, 1), torch.cat(pos, 1), torch.cat(mask_flat, 1)
    spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=src.device)
    level_start_index = torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))
    valid_ratios = torch.stack([valid_ratio(m) for m in masks], 1)
    return {
        "src": src,
        "pos": pos,
        "memory_mask": mask_flat,
        "spatial_shapes": spatial_shapes,
        "level_start_index": level_start_index,
        "valid_ratios": valid_ratios,
    }


def encoder_output_proposals(memory: Tensor, padding_mask: Tensor, spatial_shapes: Tensor) -> Tuple[Tensor, Tensor]:
    """One proposal per token of ``memory [B,S,D]``: its cell centre (normalised by the valid size),
    size ``0.05 * 2^level``, un-sigmoided ``[B,S,4]`` with ``inf`` on padding and near the border;
    and the memory with those tokens zeroed ``[B,S,D]`` (to be projected by the caller)."""
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
    return out, proposals


# ============================================================================================
# Query groups decoded in one pass
# ============================================================================================


def block_diagonal_mask(sizes: Sequence[int], device, block_of: Optional[Sequence[int]] = None) -> Tensor:
    """Self-attention mask ``[T,T]`` (True = blocked) over consecutive parts of ``sizes`` queries:
    a query sees only the queries of its own block (``block_of[i]``, default: part ``i`` alone)."""
    ids = torch.as_tensor(list(block_of) if block_of is not None else list(range(len(sizes))), device=device)
    gid = torch.repeat_interleave(ids, torch.as_tensor(list(sizes), device=device))
    return gid[:, None] != gid[None, :]


def group_slices(names: Sequence[str], sizes: Sequence[int]) -> Dict[str, slice]:
    """``{name: slice}`` of consecutive query ranges of the given sizes."""
    slices, start = {}, 0
    for name, n in zip(names, sizes):
        slices[name] = slice(start, start + n)
        start += n
    return slices


def attention_taps(maps: Optional[Sequence[Dict[str, Tensor]]], spatial_shapes: Optional[Tensor] = None,
                   level_start_index: Optional[Tensor] = None) -> Dict[str, Any]:
    """Per-layer decoder attention maps as taps; empty without maps (``return_attention=False``).

    ``decoder_self_attn``: per layer the per-head softmax weights *before dropout* ``[B,M,T,T]``
    over all ``T`` decoded queries (groups are blocks of it, see ``group_slices``).
    ``decoder_cross_attn``: per layer one of

    * ``{"kind": "deformable", "sampling_locations" [B,T,M,L,P,2], "attention_weights"
      [B,T,M,L,P], "spatial_shapes" [L,2], "level_start_index" [L]}`` (Deformable DETR, DINO);
    * ``{"kind": "dense", "attention_weights" [B,M,T,S]}`` (DAB-DETR: softmax over the S memory
      tokens, before dropout).

    :func:`tprd.distill.attention.cross_attention_map` turns either into the head- or
    query-aggregated map of one query group.
    """
    if maps is None:
        return {}
    cross = []
    for m in maps:
        if "sampling_locations" in m:
            cross.append({
                "kind": "deformable",
                "sampling_locations": m["sampling_locations"],
                "attention_weights": m["attention_weights"],
                "spatial_shapes": spatial_shapes,
                "level_start_index": level_start_index,
            })
        else:
            cross.append({"kind": "dense", "attention_weights": m["cross_attn"]})
    return {"decoder_self_attn": [m["self_attn"] for m in maps], "decoder_cross_attn": cross}


def multihead_attention_weights(attn: nn.MultiheadAttention, query: Tensor, key: Tensor,
                                attn_mask: Optional[Tensor] = None) -> Tensor:
    """Per-head softmax weights ``[B,M,Q,K]`` of a batch-first :class:`nn.MultiheadAttention`
    (packed in-projection) *before* its dropout (docs/methods.md#diff-19; ``need_weights`` would give them
    after dropout). ``attn_mask [Q,K]``: bool (True = blocked) or additive float."""
    heads, dim = attn.num_heads, attn.embed_dim
    w_q, w_k, _ = attn.in_proj_weight.chunk(3)
    b_q, b_k = (None, None) if attn.in_proj_bias is None else attn.in_proj_bias.chunk(3)[:2]
    bsz, nq, nk = query.shape[0], query.shape[1], key.shape[1]
    q = F.linear(query, w_q, b_q).view(bsz, nq, heads, dim // heads).transpose(1, 2)
    k = F.linear(key, w_k, b_k).view(bsz, nk, heads, dim // heads).transpose(1, 2)
    logits = (q * (dim // heads) ** -0.5) @ k.transpose(-2, -1)
    if attn_mask is not None:
        logits = logits.masked_fill(attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else logits + attn_mask
    return logits.softmax(-1)


# ============================================================================================
# detrex initialisation helpers
# ============================================================================================


def focal_prior_bias(prior_prob: float = 0.01) -> float:
    """Class-head bias giving sigmoid probability ``prior_prob`` (detrex: -log(99))."""
    return -math.log((1 - prior_prob) / prior_prob)


@torch.no_grad()
def reset_neck_parameters(neck: nn.Module) -> None:
    """detrex neck init: every conv Xavier-uniform with zero bias."""
    for m in neck.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.xavier_uniform_(m.weight, gain=1)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


# ============================================================================================
# The shared detector base
# ============================================================================================


class DETRDetector(nn.Module):
    """Inputs, outputs and the train/eval entry point of a DETR-style detector, and the interface
    every detector provides to the distiller and the distillation methods.

    **The distillation interface.** :mod:`tprd.distill` reads a detector through these members
    only (never through ``hasattr`` probes or class names):

    * attributes :attr:`family`, :attr:`query_kind`, :attr:`embed_dim`, :attr:`num_classes`,
      :attr:`num_queries`, :attr:`criterion`, the ``pixel_mean`` / ``pixel_std`` buffers;
    * properties :attr:`num_stages`, :attr:`num_feature_levels`, :attr:`num_neck_levels`,
      :attr:`device`;
    * methods :meth:`preprocess`, :meth:`prepare_targets`, :meth:`forward_features`,
      :meth:`forward_outputs`, :meth:`decode_memory` (the post-encoder path CrossKD needs),
      :meth:`compute_losses`, :meth:`keep_all_stages_in_eval` and the property :attr:`focal_loss_params`.

    detrex interop (configs, checkpoint keys, parity layouts) is not part of a detector: each family
    has an adapter in :mod:`tprd.checkpoint.detrex`, registered under :attr:`family`.

    A subclass sets the class attributes, calls :meth:`register_pixel_stats` in ``__init__`` and
    implements :attr:`num_stages`, :attr:`num_feature_levels`, :meth:`extract_features`,
    :meth:`encode_images` and :meth:`decode_memory`; it may override :meth:`forward_outputs`
    (default: ``encode_images`` then ``decode_memory``), :meth:`compute_losses` (default: the
    criterion's weighted losses) and :meth:`train_outputs` (default: ``forward_outputs(images)``).

    ``batched_inputs``: list of dicts ``image`` ``[3,H,W]`` RGB 0..255, ``height``/``width`` (output
    size, optional), ``gt_boxes`` ``[G,4]`` xyxy pixels of ``image`` (``gt_boxes_xyxy`` accepted
    too) and ``gt_classes`` ``[G]`` (training).
    """

    #: The architecture, ``"deformable_detr"``, ``"dab_detr"``, ``"dino"`` or ``"rt_detr"``: two detectors of one
    #: family share the encoder-state layout, so one can decode the other's memory (CrossKD).
    family: str
    #: How the decoder's queries look, which decides what a query group must carry:
    #: ``"position"`` (single-stage Deformable DETR: content ``[Q,D]`` + position ``[Q,D]``, 2-d
    #: references from the model's own reference-point layer), ``"proposal"`` (two-stage
    #: Deformable DETR: content + position from the selected proposals, 4-d references; no
    #: reference-point layer), ``"anchor"`` (DAB-DETR: anchor boxes ``[Q,4]``, zero content) or
    #: ``"content_box"`` (DINO: content ``[Q,D]`` + reference boxes ``[Q,4]``).
    query_kind: str
    #: Width ``D`` of the neck maps, the encoder memory and the decoder queries.
    embed_dim: int
    #: Foreground classes ``C`` (sigmoid heads, no background logit).
    num_classes: int
    #: Queries ``Q`` of the main group.
    num_queries: int
    #: The set criterion (focal ``alpha``/``gamma``, ``weight_losses``); ``None`` in an
    #: inference-only model.
    criterion: Optional[nn.Module]
    select_box_nums_for_evaluation: int
    #: ``prepare_targets`` raises ``KeyError`` on an input without GT (else it gives empty targets)
    require_gt: bool = False

    # ---------------------------------------------------------------------------------------
    # Sizes
    # ---------------------------------------------------------------------------------------
    @property
    def num_stages(self) -> int:  # pragma: no cover - every detector defines it
        """Decoder layers ``L``: the leading dimension of every stacked prediction ``[L,B,Q,.]``."""
        raise NotImplementedError

    @property
    def num_feature_levels(self) -> int:  # pragma: no cover - every detector defines it
        """Levels of the encoder memory (``spatial_shapes`` is ``[num_feature_levels, 2]``)."""
        raise NotImplementedError

    @property
    def num_neck_levels(self) -> int:
        """Maps in the ``neck`` tap (each ``[B,D,H_l,W_l]``); the encoder reads all of them."""
        return self.num_feature_levels

    def register_pixel_stats(self, pixel_mean: Sequence[float], pixel_std: Sequence[float]) -> None:
        """Non-persistent ``pixel_mean`` / ``pixel_std`` buffers ``[3,1,1]``."""
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(3, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(3, 1, 1), False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    # ---------------------------------------------------------------------------------------
    # Inputs
    # ---------------------------------------------------------------------------------------
    def preprocess(self, batched_inputs: Sequence[Mapping[str, Any]]) -> ImageBatch:
        """Normalised, zero-padded ``[B,3,H,W]`` batch and its padding mask (``True`` = padding)."""
        return images_to_batch([x["image"] for x in batched_inputs], self.pixel_mean, self.pixel_std)

    def prepare_targets(self, batched_inputs: Sequence[Mapping[str, Any]]) -> List[Dict[str, Tensor]]:
        """``{"labels" [G], "boxes" [G,4]}`` per image; boxes normalised cxcywh by the image's own size."""
        targets = []
        for i, x in enumerate(batched_inputs):
            h, w = x["image"].shape[-2:]
            gt = x.get("gt_boxes", x.get("gt_boxes_xyxy"))
            classes = x.get("gt_classes")
            if self.require_gt and (gt is None or classes is None):
                raise KeyError(f"batched_inputs[{i}] needs 'gt_boxes' and 'gt_classes' for training")
            gt = torch.zeros(0, 4) if gt is None else gt
            classes = torch.zeros(0) if classes is None else classes
            boxes = torch.as_tensor(gt, dtype=torch.float32, device=self.device)
            labels = torch.as_tensor(classes, dtype=torch.int64, device=self.device)
            scale = torch.as_tensor([w, h, w, h], dtype=torch.float32, device=self.device)
            targets.append({"labels": labels.reshape(-1), "boxes": box_xyxy_to_cxcywh(boxes.reshape(-1, 4) / scale)})
        return targets

    # ---------------------------------------------------------------------------------------
    # Training / inference entry point
    # ---------------------------------------------------------------------------------------
    def extract_features(self, images: ImageBatch) -> Tuple[Dict[str, Tensor], List[Tensor], List[Tensor]]:  # pragma: no cover
        """Backbone dict of ``[B,C_k,h_k,w_k]``, neck maps (list of ``[B,D,H_l,W_l]``) and their
        padding masks (list of ``[B,H_l,W_l]``, True = padding)."""
        raise NotImplementedError

    def forward_features(self, images: ImageBatch) -> Dict[str, Any]:
        """Backbone and neck only (what feature-level distillation needs of a teacher):
        ``{"backbone": {name: [B,C_k,h_k,w_k]}, "neck": [[B,D,H_l,W_l]] * num_neck_levels,
        "neck_masks": [[B,H_l,W_l]] * num_neck_levels}``."""
        backbone, neck, masks = self.extract_features(images)
        return {"backbone": backbone, "neck": list(neck), "neck_masks": list(masks)}

    def encode_images(self, images: ImageBatch) -> Tuple[Dict[str, Any], Dict[str, Any]]:  # pragma: no cover
        """Backbone, neck and encoder: the encoder state ``enc`` (what :meth:`decode_memory` reads)
        and the feature taps (``backbone``, ``neck``, ``neck_masks`` and the family's others)."""
        raise NotImplementedError

    def forward_outputs(self, images: ImageBatch, query_groups: Sequence[QueryGroup] = (), *,
                        targets: Optional[Sequence[Dict[str, Tensor]]] = None,
                        return_attention: bool = False) -> DetectorOutputs:
        """The full stage-wise forward of a padded batch ``images.tensor [B,3,H,W]``:
        :meth:`encode_images`, then :meth:`decode_memory` (which lists the family's taps).

        Returns :class:`DetectorOutputs`: ``main`` (logits ``[L,B,Q,C]``, boxes ``[L,B,Q,4]``
        normalised cxcywh, hidden ``[L,B,Q,D]``, per-stage input references), ``groups[name]`` of
        each extra ``query_groups`` entry (same layout with that group's query count; decoded in the
        same pass, attending only to its own queries), ``enc`` (two-stage proposals, if any), ``dn``
        (denoising, if any) and ``taps``: ``backbone``, ``neck``, ``neck_masks``, the encoder state
        (``memory [B,S,D]``, ``memory_mask [B,S]``, ``spatial_shapes [num_feature_levels,2]`` and
        the family's other entries), ``queries`` (the model's own initial queries, see
        :attr:`query_kind`), ``group_slices`` and, with ``return_attention``, the per-layer decoder
        attention (:func:`attention_taps`). ``targets`` (per image ``{"labels" [G], "boxes" [G,4]}``)
        are used only by a detector that builds training queries from them (DINO's denoising);
        the others ignore them.
        """
        enc, taps = self.encode_images(images)
        return self.decode_memory(enc, query_groups, targets=targets, return_attention=return_attention, taps=taps)

    def decode_memory(self, enc: Dict[str, Tensor], query_groups: Sequence[QueryGroup] = (), *,
                      targets: Optional[Sequence[Dict[str, Tensor]]] = None, return_attention: bool = False,
                      taps: Optional[Dict[str, Any]] = None) -> DetectorOutputs:  # pragma: no cover
        """The post-encoder path alone -- queries, decoder, heads -- on an encoder state ``enc``
        (``memory [B,S,D]``, ``memory_mask [B,S]``, ``spatial_shapes [num_feature_levels,2]`` and
        the family's other entries, as in the ``taps`` of :meth:`forward_outputs`), which may come
        from another model of the same :attr:`family` (CrossKD decodes the student's memory with
        the teacher). Returns what :meth:`forward_outputs` returns; ``taps`` are copied into the
        result's taps."""
        raise NotImplementedError

    def keep_all_stages_in_eval(self) -> None:
        """Make an eval-mode :meth:`forward_outputs` return all :attr:`num_stages` stages (what a
        distillation teacher must give). Default: nothing to do, every detector here runs all its
        decoder layers; RT-DETR, which stops at ``eval_idx`` in eval, overrides it."""

    @property
    def focal_loss_params(self) -> Tuple[float, float]:
        """``(alpha, gamma)`` of the sigmoid focal class loss B2 (docs/methods.md#b2) for this
        detector's predictions, which a method uses to put a GT loss on an extra query group
        (DETRDistill's prior assignment). Default: the criterion's focal ``alpha`` / ``gamma``
        (0.25 / 2 without a criterion)."""
        if self.criterion is None:
            return 0.25, 2.0
        return float(self.criterion.alpha), float(self.criterion.gamma)

    def train_outputs(self, images: ImageBatch, targets: Sequence[Dict[str, Tensor]]) -> DetectorOutputs:
        """The training forward's :meth:`forward_outputs` call (DINO passes the targets, for denoising)."""
        return self.forward_outputs(images)

    def compute_losses(self, outputs: DetectorOutputs, targets: Sequence[Dict[str, Tensor]]) -> Dict[str, Tensor]:
        """Weighted GT losses (detrex names) of a :meth:`forward_outputs` result."""
        if self.criterion is None:
            raise RuntimeError(f"{type(self).__name__} was built without a criterion; it cannot compute losses")
        return self.criterion.weight_losses(self.criterion(outputs, targets))

    def forward(self, batched_inputs: Sequence[Mapping[str, Any]]):
        """Training: dict of weighted losses (detrex names). Eval: per image ``{"boxes"`` xyxy in the
        ``(height, width)`` frame, ``"scores", "labels"}``."""
        images = self.preprocess(batched_inputs)
        if self.training:
            targets = self.prepare_targets(batched_inputs)
            return self.compute_losses(self.train_outputs(images, targets), targets)
        outputs = self.forward_outputs(images)
        detections = self.inference(outputs, images.image_sizes)
        output_sizes = [(x.get("height", s[0]), x.get("width", s[1]))
                        for x, s in zip(batched_inputs, images.image_sizes)]
        return self.postprocess(detections, images.image_sizes, output_sizes)

    def inference(
        self, outputs: Union[DetectorOutputs, StagePredictions], image_sizes: Sequence[Tuple[int, int]]
    ) -> List[Dict[str, Tensor]]:
        """Top-``select_box_nums_for_evaluation`` (score, class, box) of the final stage over the
        ``Q x C`` sigmoid scores, per image ``{"boxes"`` xyxy pixels of the network input (before
        rescaling), ``"scores", "labels", "queries"}`` in decreasing score order (detrex ``inference``)."""
        main = outputs.main if isinstance(outputs, DetectorOutputs) else outputs
        return select_topk(main.logits[-1], main.boxes[-1], image_sizes, self.select_box_nums_for_evaluation)

    @staticmethod
    def postprocess(detections, image_sizes, output_sizes) -> List[Dict[str, Tensor]]:
        """Rescale to ``output_sizes`` (height, width), clip, drop empty boxes (detectron2)."""
        out = []
        for det, size, (oh, ow) in zip(detections, image_sizes, output_sizes):
            det = detector_postprocess(det, size, int(oh), int(ow))
            out.append({"boxes": det["boxes"], "scores": det["scores"], "labels": det["labels"]})
        return out


class MultiScaleDETRDetector(DETRDetector):
    """:class:`DETRDetector` with the multi-scale deformable encoder front end.

    Needs ``backbone`` (image -> dict of maps), ``neck`` (dict -> list of ``[B,D,H_l,W_l]``),
    ``position_embedding``, ``mask_mode`` and ``transformer`` with ``level_embeds [L,D]`` and an
    ``encoder(src, pos, spatial_shapes, level_start_index, valid_ratios, padding_mask)``.
    """

    @property
    def num_feature_levels(self) -> int:
        return self.transformer.num_feature_levels

    def extract_features(self, images: ImageBatch):
        """Backbone dict, neck maps (list of ``[B,D,H_l,W_l]``) and their padding masks ``[B,H_l,W_l]``."""
        features = self.backbone(images.tensor)
        feats = self.neck(features)
        masks = level_masks(images.mask, images.image_sizes, [f.shape[-2:] for f in feats], self.mask_mode)
        return features, feats, masks

    def encode(self, feats: Sequence[Tensor], masks: Sequence[Tensor]) -> Dict[str, Tensor]:
        """Add sine + level embeddings, flatten the levels and run the encoder.

        Returns ``memory [B,S,D]``, ``memory_mask [B,S]`` (True = padding), ``pos [B,S,D]``,
        ``spatial_shapes [L,2]``, ``level_start_index [L]``, ``valid_ratios [B,L,2]``.
        """
        tr = self.transformer
        x = flatten_levels(feats, masks, self.position_embedding, tr.level_embeds)
        memory = tr.encoder(x["src"], x["pos"], x["spatial_shapes"], x["level_start_index"], x["valid_ratios"],
                            x["memory_mask"])
        return {
            "memory": memory,
            "memory_mask": x["memory_mask"],
            "pos": x["pos"],
            "spatial_shapes": x["spatial_shapes"],
            "level_start_index": x["level_start_index"],
            "valid_ratios": x["valid_ratios"],
        }

    def encode_images(self, images: ImageBatch) -> Tuple[Dict[str, Tensor], Dict[str, Any]]:
        """Backbone, neck and encoder: the encoder state (:meth:`encode`) and the feature taps
        ``backbone`` (dict), ``neck`` (list of ``[B,D,H_l,W_l]``), ``neck_masks``."""
        features, feats, masks = self.extract_features(images)
        enc = self.encode(feats, masks)
        return enc, {"backbone": features, "neck": feats, "neck_masks": masks}

    def finish_init(self, pixel_mean: Sequence[float], pixel_std: Sequence[float], use_checkpoint,
                    msda_backend: Optional[str], device: Optional[str]) -> None:
        """The end of ``__init__`` (once every module exists): pixel statistics, the checkpointing and
        deformable-attention backend options of every layer, the head init
        (``reset_head_parameters``), then the device (``None``: leave it)."""
        self.register_pixel_stats(pixel_mean, pixel_std)
        set_layer_options(self, use_checkpoint, msda_backend)
        self.reset_head_parameters()
        if device is not None:
            self.to(device)

    def memory_taps(self, enc: Mapping[str, Tensor], keys: Sequence[str] = (
            "memory", "memory_mask", "spatial_shapes", "level_start_index", "valid_ratios")) -> Dict[str, Any]:
        """The encoder-state entries exposed as taps."""
        return {k: enc[k] for k in keys}

    def decoder_taps(self, enc: Mapping[str, Tensor], taps: Optional[Dict[str, Any]], queries: QueryGroup,
                     next_reference: Tensor, slices: Dict[str, slice], maps,
                     keys: Optional[Sequence[str]] = None) -> Dict[str, Any]:
        """A copy of ``taps`` with the encoder state (:meth:`memory_taps`, ``keys``), the model's own
        ``queries``, the main group's ``next_reference``, the ``group_slices`` and the decoder
        attention maps (:func:`attention_taps`; nothing unless ``maps``)."""
        taps = dict(taps or {})
        taps.update(self.memory_taps(enc) if keys is None else self.memory_taps(enc, keys))
        taps.update(queries=queries, next_reference=next_reference, group_slices=slices)
        taps.update(attention_taps(maps, enc["spatial_shapes"], enc["level_start_index"]))
        return taps
