"""RT-DETRv2 (Lv et al. 2024; RT-DETR, Zhao et al. CVPR 2024) as a :class:`DETRDetector`.

The model reads top to bottom as the paper does::

    images [B,3,H,W] RGB in [0,1] (no mean/std; H, W multiples of 32)
      --PResNet-vd--> res3, res4, res5 (strides 8/16/32)
      --hybrid encoder: AIFI on res5 (one transformer layer), CCFM (FPN + PAN of CSP-RepVGG blocks)
        --> 3 maps [B,D,H_l,W_l] (the "neck")
      --decoder input_proj (1x1 conv + BN per level), flatten, concat --> memory [B,S,D]
      --query selection: every token scored by enc_score_head / boxed by enc_bbox_head + its anchor;
        the top-Q tokens by max class logit give the content (their features, detached) and the
        reference boxes (detached)
      --(training) contrastive denoising queries in front, behind an attention mask
      --decoder: L x [self-attn, deformable cross-attn with per-level points, FFN] (post-norm),
        query position = MLP(reference box); each layer refines the box with its own head
      --per-layer heads --> logits [L,B,Q,C], boxes [L,B,Q,4]

Submodules are ``backbone`` (:class:`~tprd.modeling.presnet.PResNet`), ``encoder``
(:class:`~tprd.modeling.hybrid_encoder.HybridEncoder`) and ``decoder``
(:class:`~tprd.modeling.rtdetr_decoder.RTDETRTransformerv2`), with the reference's module names
inside, so ``model.state_dict()`` has exactly the keys of an official RT-DETRv2 checkpoint
(:func:`tprd.checkpoint.load_rtdetr_checkpoint` loads them strictly).

Things worth knowing (all as in the reference, lyuwenyu/RT-DETR ``rtdetrv2_pytorch``; docs/rt_detr.md):

* There is no padding mask. A batch of different sizes is zero-padded bottom/right to a common
  size that is a multiple of 32 (``size_divisibility``); boxes are normalised to that padded frame.
* In eval the reference runs the decoder only up to ``eval_idx`` (``rtdetrv2_r50vd_m_7x``: layer 2
  of 6) and predicts from that layer; :attr:`eval_all_layers` runs all layers instead (the stage
  ``eval_idx`` is unchanged: later layers never feed earlier ones). :meth:`inference` always uses
  stage ``eval_idx``.
* The anchors / valid mask and the AIFI position embedding are cached for ``eval_spatial_size``
  (the anchors are persistent buffers, stored in official checkpoints for 640x640) and used in eval at
  that size; other sizes (and training) compute them, with bitwise equal values at that size.
* The box of layer ``i > 0`` is computed from the previous layer's box *without* detaching it,
  so its box loss trains the previous layer's box head too (one layer back: that box is refined from
  a detached reference); the reference point the layer attends with is the detached one.
* The criterion (:class:`~tprd.modeling.rtdetr_criterion.RTDETRCriterion`) uses VFL; loss names
  are the reference's: ``loss_vfl``, ``loss_bbox``, ``loss_giou`` with ``_aux_i``, ``_dn_i``, ``_enc_0``.

Beyond the reference: extra :class:`~tprd.modeling.outputs.QueryGroup` s (content ``[B?,Q,D]`` +
normalised reference boxes ``[B?,Q,4]``) are decoded in the same pass behind a block-diagonal
self-attention mask, and :meth:`RTDETR.forward_outputs` returns stacked per-stage predictions, the
encoder proposals and denoising predictions apart, and the taps the distillation methods use.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .detector import DETRDetector, attention_taps, block_diagonal_mask, group_slices, images_to_batch
from .hybrid_encoder import HybridEncoder
from .outputs import DetectorOutputs, ImageBatch, QueryGroup, StagePredictions
from .presnet import PResNet
from .rtdetr_criterion import RTDETRCriterion, RTDETRHungarianMatcher, RTDETRPostProcessor
from .rtdetr_decoder import RTDETRTransformerv2

__all__ = ["RTDETR", "build_rtdetr_from_reference_config"]


class RTDETR(DETRDetector):
    """RT-DETRv2.

    Args:
        backbone: :class:`PResNet` (returns a list of maps).
        encoder: :class:`HybridEncoder`.
        decoder: :class:`RTDETRTransformerv2`.
        criterion: :class:`RTDETRCriterion` (training only).
        postprocessor: :class:`RTDETRPostProcessor` (its ``num_top_queries`` is
            ``select_box_nums_for_evaluation``); default: 300 per image.
        pixel_mean, pixel_std: ``(x - mean) / std`` of 0..255 inputs; the default (0, 255) gives
            RT-DETR's ``[0, 1]`` input without normalisation.
        size_divisibility: pad each batch to a multiple of this (32: the hybrid encoder's FPN needs it).
        eval_all_layers: run every decoder layer in eval (default: stop at ``eval_idx``, as the reference).
        device: where to put the model (``None``: leave it).
    """

    family = "rt_detr"
    query_kind = "content_box"
    require_gt = False

    def __init__(self, backbone: nn.Module, encoder: HybridEncoder, decoder: RTDETRTransformerv2,
                 criterion: Optional[RTDETRCriterion] = None, postprocessor: Optional[RTDETRPostProcessor] = None,
                 pixel_mean: Sequence[float] = (0.0, 0.0, 0.0), pixel_std: Sequence[float] = (255.0, 255.0, 255.0),
                 size_divisibility: int = 32, eval_all_layers: bool = False, device: Optional[str] = None):
        super().__init__()
        # assignment order as the reference (backbone, decoder, encoder): state_dict order = official order
        self.backbone = backbone
        self.decoder = decoder
        self.encoder = encoder
        self.criterion = criterion
        if criterion is not None:
            criterion.aux_loss = criterion.aux_loss and decoder.aux_loss
        self.postprocessor = postprocessor if postprocessor is not None else RTDETRPostProcessor(decoder.num_classes)
        self.embed_dim = decoder.hidden_dim
        self.num_classes = decoder.num_classes
        self.num_queries = decoder.num_queries
        self.select_box_nums_for_evaluation = self.postprocessor.num_top_queries
        self.size_divisibility = int(size_divisibility)
        self.eval_all_layers = eval_all_layers
        self.register_pixel_stats(pixel_mean, pixel_std)
        if device is not None:
            self.to(device)

    # ---------------------------------------------------------------------------------------
    # Sizes
    # ---------------------------------------------------------------------------------------
    @property
    def num_stages(self) -> int:
        return self.decoder.num_layers

    @property
    def num_feature_levels(self) -> int:
        return self.decoder.num_levels

    @property
    def num_neck_levels(self) -> int:
        return len(self.encoder.in_channels)

    @property
    def eval_idx(self) -> int:
        return self.decoder.eval_idx

    def keep_all_stages_in_eval(self) -> None:
        """A distillation teacher runs every decoder layer in eval (:attr:`eval_all_layers`); its
        stage ``eval_idx`` is unchanged, so is :meth:`inference`."""
        self.eval_all_layers = True

    @property
    def focal_loss_params(self) -> Tuple[float, float]:
        """The focal ``(alpha, gamma)`` of RT-DETR's matcher (0.25 / 2), not the criterion's: its
        ``alpha`` (0.75) is VFL's weight of the negative term, which as a focal ``alpha`` would weight
        negatives 0.25 and positives 0.75, the reverse of every focal loss here (docs/rt_detr.md#distillation)."""
        if self.criterion is None:
            return 0.25, 2.0
        return float(self.criterion.matcher.alpha), float(self.criterion.matcher.gamma)

    # ---------------------------------------------------------------------------------------
    # Inputs
    # ---------------------------------------------------------------------------------------
    def _padded_size(self, sizes: Sequence[Tuple[int, int]]) -> Tuple[int, int]:
        d = max(self.size_divisibility, 1)
        h = max(s[0] for s in sizes)
        w = max(s[1] for s in sizes)
        return int(math.ceil(h / d) * d), int(math.ceil(w / d) * d)

    def preprocess(self, batched_inputs: Sequence[Mapping[str, Any]]) -> ImageBatch:
        """``(x - pixel_mean) / pixel_std`` ([0, 1] by default), zero-padded bottom/right to a
        multiple of ``size_divisibility``; the mask (True = padding) is informative only."""
        batch = images_to_batch([x["image"] for x in batched_inputs], self.pixel_mean, self.pixel_std)
        return self.pad_batch(batch)

    def pad_batch(self, batch: ImageBatch) -> ImageBatch:
        """Pad an :class:`ImageBatch` to a multiple of ``size_divisibility``."""
        hp, wp = self._padded_size([tuple(batch.tensor.shape[-2:])])
        h, w = batch.tensor.shape[-2:]
        if (hp, wp) == (h, w):
            return batch
        tensor = F.pad(batch.tensor, (0, wp - w, 0, hp - h))
        mask = F.pad(batch.mask, (0, wp - w, 0, hp - h), value=True)
        return ImageBatch(tensor=tensor, mask=mask, image_sizes=batch.image_sizes)

    def prepare_targets(self, batched_inputs: Sequence[Mapping[str, Any]]) -> List[Dict[str, Tensor]]:
        """Boxes normalised cxcywh by the *padded* batch size (RT-DETR predicts in that frame; equal
        to the image's own size when nothing is padded)."""
        targets = super().prepare_targets(batched_inputs)
        sizes = [tuple(int(s) for s in x["image"].shape[-2:]) for x in batched_inputs]
        hp, wp = self._padded_size(sizes)
        for t, (h, w) in zip(targets, sizes):
            if (h, w) != (hp, wp):
                scale = torch.tensor([w / wp, h / hp, w / wp, h / hp], dtype=t["boxes"].dtype, device=t["boxes"].device)
                t["boxes"] = t["boxes"] * scale
        return targets

    def images_from_tensor(self, images: Tensor) -> ImageBatch:
        """An :class:`ImageBatch` of already normalised images ``[B,3,H,W]`` (the reference's input)."""
        b, _, h, w = images.shape
        mask = torch.zeros(b, h, w, dtype=torch.bool, device=images.device)
        return self.pad_batch(ImageBatch(tensor=images, mask=mask, image_sizes=[(h, w)] * b))

    # ---------------------------------------------------------------------------------------
    # Backbone -> hybrid encoder -> memory
    # ---------------------------------------------------------------------------------------
    def extract_features(self, images: ImageBatch):
        """Backbone dict ``res3..res5``, the hybrid encoder's maps and (all-False) masks."""
        feats, neck, masks, _ = self._features(images)
        return feats, neck, masks

    def _features(self, images: ImageBatch):
        maps = self.backbone(images.tensor)
        names = getattr(self.backbone, "out_names", [f"res{i + 3}" for i in range(len(maps))])
        neck, aifi = self.encoder(maps, return_aifi=True)
        masks = [torch.zeros(n.shape[0], *n.shape[-2:], dtype=torch.bool, device=n.device) for n in neck]
        return dict(zip(names, maps)), neck, masks, aifi

    def encode(self, neck: Sequence[Tensor]) -> Dict[str, Any]:
        """Decoder input projection: ``memory [B,S,D]``, ``memory_mask [B,S]`` (all False),
        ``spatial_shapes [L,2]``, ``level_start_index [L]``, ``valid_ratios [B,L,2]`` (ones) and
        ``projected`` (the per-level maps)."""
        memory, shapes, maps = self.decoder.project(neck)
        spatial = torch.as_tensor(shapes, dtype=torch.long, device=memory.device)
        start = torch.cat((spatial.new_zeros(1), spatial.prod(1).cumsum(0)[:-1]))
        bsz = memory.shape[0]
        return {
            "memory": memory,
            "memory_mask": torch.zeros(bsz, memory.shape[1], dtype=torch.bool, device=memory.device),
            "spatial_shapes": spatial,
            "level_start_index": start,
            "valid_ratios": memory.new_ones(bsz, len(shapes), 2),
            "projected": maps,
        }

    def encode_images(self, images: ImageBatch) -> Tuple[Dict[str, Any], Dict[str, Any]]:
        feats, neck, masks, aifi = self._features(images)
        enc = self.encode(neck)
        taps = {"backbone": feats, "neck": list(neck), "neck_masks": masks, "aifi": aifi,
                "image_sizes": list(images.image_sizes), "padded_size": tuple(images.tensor.shape[-2:])}
        return enc, taps

    # ---------------------------------------------------------------------------------------
    # Queries, decoder, heads
    # ---------------------------------------------------------------------------------------
    def _group_tensors(self, group: QueryGroup, bsz: int, dim: int, sel: Dict[str, Tensor]) -> Tuple[Tensor, Tensor]:
        if group.position is not None:
            raise ValueError(f"query group {group.name!r}: RT-DETR derives query positions from the reference "
                             "boxes; pass content and reference only (position=None)")
        content, reference = group.content, group.reference
        if reference is None or reference.shape[-1] != 4:
            raise ValueError(f"query group {group.name!r}: RT-DETR needs 4-d reference boxes [B?,Q,4]")
        if content is None:
            content = self._own_content(group, sel, bsz, reference.shape[-2])
        if content.dim() == 2:
            content = content.unsqueeze(0).expand(bsz, -1, -1)
        if reference.dim() == 2:
            reference = reference.unsqueeze(0).expand(bsz, -1, -1)
        if content.shape[-1] != dim or content.shape[:2] != reference.shape[:2]:
            raise ValueError(f"query group {group.name!r}: content {tuple(content.shape)} and reference "
                             f"{tuple(reference.shape)} do not fit [B,Q,{dim}] / [B,Q,4] with B={bsz}")
        return content, reference

    def _own_content(self, group: QueryGroup, sel: Dict[str, Tensor], bsz: int, num: int) -> Tensor:
        """This model's selected-query features (``enc_output`` of its memory, detached as its own
        content is) at the group's ``token_index`` -- the tokens another RT-DETR selected."""
        idx = group.token_index
        if idx is None:
            raise ValueError(f"query group {group.name!r}: no content and no token_index")
        if self.decoder.learn_query_content:
            raise ValueError(f"query group {group.name!r}: own query content needs selected-feature content; "
                             "this RT-DETR learns its query content (learn_query_content=True)")
        feats = sel["token_features"]
        if idx.dim() != 2 or idx.shape != (bsz, num):
            raise ValueError(f"query group {group.name!r}: token_index {tuple(idx.shape)} must be [B,Q] = {(bsz, num)}")
        if int(idx.max()) >= feats.shape[1]:
            raise ValueError(f"query group {group.name!r}: token index {int(idx.max())} but this model has "
                             f"{feats.shape[1]} memory tokens (teacher and student need the same strides and input)")
        return feats.gather(1, idx.to(feats.device).unsqueeze(-1).expand(-1, -1, feats.shape[-1])).detach()

    def layers_to_run(self) -> int:
        """All decoder layers in training (or with :attr:`eval_all_layers`), else ``eval_idx + 1``."""
        if self.training or self.eval_all_layers:
            return self.decoder.num_layers
        return self.decoder.eval_idx + 1

    def decode_memory(self, enc: Dict[str, Any], query_groups: Sequence[QueryGroup] = (), *,
                      targets: Optional[Sequence[Dict[str, Tensor]]] = None, use_dn: Optional[bool] = None,
                      return_attention: bool = False, taps: Optional[Dict[str, Any]] = None,
                      num_layers: Optional[int] = None) -> DetectorOutputs:
        """Query selection, (denoising,) decoder and heads on an encoder state (``memory [B,S,D]``,
        ``spatial_shapes [L,2]``; possibly another RT-DETR's). ``use_dn``: ``None`` = in training
        when targets are given and ``num_denoising > 0``. ``num_layers``: default
        :meth:`layers_to_run`."""
        dec = self.decoder
        memory = enc["memory"]
        shapes = [tuple(int(v) for v in s) for s in torch.as_tensor(enc["spatial_shapes"]).tolist()]
        bsz, d = memory.shape[0], self.embed_dim
        if use_dn is None:
            use_dn = self.training and targets is not None and dec.num_denoising > 0
        dn_content = dn_ref = dn_mask = dn_meta = dn_class = None
        if use_dn:
            if targets is None:
                raise ValueError("use_dn=True needs the targets (prepare_targets(batched_inputs))")
            dn_content, dn_ref, dn_mask, dn_meta, dn_class = dec.denoising(targets)
        sel = dec.select(memory, shapes)

        names = ["main"] + [g.name for g in query_groups]
        if len(set(names)) != len(names) or "dn" in names:
            raise ValueError(f"query group names must be unique and not 'main' or 'dn', got {names[1:]}")
        parts = [(sel["content"], sel["reference_unact"].sigmoid())]
        parts += [self._group_tensors(g, bsz, d, sel) for g in query_groups]
        if dn_content is not None:
            parts.insert(0, (dn_content, dn_ref.sigmoid()))
            names.insert(0, "dn")
        sizes = [c.shape[1] for c, _ in parts]
        content = torch.cat([c.to(memory.dtype) for c, _ in parts], 1)
        reference = torch.cat([r.to(memory.dtype) for _, r in parts], 1)
        attn_mask = None
        has_dn = dn_content is not None
        if len(sizes) > (2 if has_dn else 1):
            block_of = [0, 0] + list(range(1, len(sizes) - 1)) if has_dn else list(range(len(sizes)))
            attn_mask = block_diagonal_mask(sizes, memory.device, block_of)
        if has_dn:
            first = sizes[0] + sizes[1]
            if attn_mask is None:
                attn_mask = dn_mask
            else:
                attn_mask[:first, :first] = dn_mask

        n = self.layers_to_run() if num_layers is None else num_layers
        out = dec.decode(content, reference, memory, shapes, attn_mask=attn_mask, num_layers=n,
                         return_attention=return_attention)
        slices = group_slices(names, sizes)
        preds = {name: StagePredictions(out["logits"][:, :, s], out["boxes"][:, :, s], out["hidden"][:, :, s],
                                        out["references"][:, :, s]) for name, s in slices.items()}
        main = preds.pop("main")
        dn_preds = preds.pop("dn", None)
        proposals = {k: sel[k] for k in ("pred_logits", "pred_boxes", "topk_indices", "hidden", "all_token_logits",
                                         "all_token_coords_unact", "anchors", "valid_mask")}
        proposals["class_agnostic"] = dec.query_select_method == "agnostic"
        dn_out = None
        if has_dn:
            dn_out = {"predictions": dn_preds, "dn_meta": dn_meta, "attn_mask": dn_mask,
                      "reference_unact": dn_ref, "content": dn_content, "query_class": dn_class}
        taps = dict(taps or {})
        taps.update({k: enc[k] for k in ("memory", "memory_mask", "spatial_shapes", "level_start_index",
                                          "valid_ratios") if k in enc})
        taps.update(queries=QueryGroup("queries", sel["content"], sel["reference_unact"].sigmoid(),
                                       token_index=sel["topk_indices"]),
                    init_reference_unact=sel["reference_unact"], group_slices=slices)
        taps.update(attention_taps(self._attention_maps(out["attention"]), enc["spatial_shapes"],
                                   enc.get("level_start_index")))
        return DetectorOutputs(main=main, groups=preds, enc=proposals, dn=dn_out, taps=taps)

    def _attention_maps(self, maps):
        """Per-level-point maps ``[B,T,M,sum P,2]`` -> ``[B,T,M,L,P,2]`` (equal points per level)."""
        if maps is None:
            return None
        points = self.decoder.decoder.layers[0].cross_attn.num_points_list
        if len(set(points)) != 1:
            raise ValueError(f"return_attention needs the same number of points on every level, got {points}")
        out = []
        for m in maps:
            loc, w = m["sampling_locations"], m["attention_weights"]
            b, t, h = loc.shape[:3]
            out.append({"self_attn": m["self_attn"],
                        "sampling_locations": loc.reshape(b, t, h, len(points), points[0], 2),
                        "attention_weights": w.reshape(b, t, h, len(points), points[0])})
        return out

    def forward_outputs(self, images: ImageBatch, query_groups: Sequence[QueryGroup] = (), *,
                        targets: Optional[Sequence[Dict[str, Tensor]]] = None, use_dn: Optional[bool] = None,
                        return_attention: bool = False) -> DetectorOutputs:
        """Stage-wise predictions of the main group (``[L_run,B,Q,.]``; ``L_run`` = all layers in
        training, ``eval_idx + 1`` in eval unless :attr:`eval_all_layers`), of each extra query group,
        the selected encoder proposals (``.enc``: ``pred_logits``, ``pred_boxes``, ``topk_indices``,
        ``hidden``, ``all_token_logits``, ``all_token_coords_unact``, ``anchors``, ``valid_mask``),
        the denoising predictions (``.dn``: ``predictions``, ``dn_meta``, ``attn_mask``, and the inputs
        ``content``, ``reference_unact``, ``query_class``: the noisy class ids) and the taps:
        ``backbone``, ``neck``, ``neck_masks``, ``aifi``, ``memory``, ``memory_mask``,
        ``spatial_shapes``, ``level_start_index``, ``valid_ratios``, ``queries``, ``group_slices``,
        ``image_sizes``, ``padded_size`` (+ attention maps with ``return_attention``)."""
        enc, taps = self.encode_images(images)
        taps["projected"] = enc.pop("projected")
        return self.decode_memory(enc, query_groups, targets=targets, use_dn=use_dn,
                                  return_attention=return_attention, taps=taps)

    def train_outputs(self, images: ImageBatch, targets: Sequence[Dict[str, Tensor]]) -> DetectorOutputs:
        """The training forward decodes the denoising queries of ``targets`` too."""
        return self.forward_outputs(images, targets=targets)

    # ---------------------------------------------------------------------------------------
    # Inference
    # ---------------------------------------------------------------------------------------
    def eval_stage(self, preds: StagePredictions) -> int:
        """Index of stage ``eval_idx`` in ``preds`` (which holds ``eval_idx + 1`` or all stages)."""
        return min(self.decoder.eval_idx, preds.logits.shape[0] - 1)

    def inference(self, outputs, image_sizes: Sequence[Tuple[int, int]]) -> List[Dict[str, Tensor]]:
        """Top-``select_box_nums_for_evaluation`` (score, class, box) of stage ``eval_idx`` per image,
        boxes ``xyxy`` in pixels of the padded network input (not clipped), in decreasing score order."""
        main = outputs.main if isinstance(outputs, DetectorOutputs) else outputs
        padded = outputs.taps.get("padded_size") if isinstance(outputs, DetectorOutputs) else None
        if padded is None:
            padded = self._padded_size(image_sizes)
        l = self.eval_stage(main)
        sizes = torch.as_tensor([[padded[1], padded[0]]] * main.logits.shape[1], device=main.boxes.device)
        return self.postprocessor(main.logits[l], main.boxes[l], sizes)

    def forward(self, batched_inputs: Sequence[Mapping[str, Any]]):
        """Training: dict of weighted losses (reference names). Eval: per image ``{"boxes"`` xyxy in the
        ``(height, width)`` frame (not clipped, as the reference), ``"scores", "labels"}``."""
        images = self.preprocess(batched_inputs)
        if self.training:
            targets = self.prepare_targets(batched_inputs)
            return self.compute_losses(self.train_outputs(images, targets), targets)
        outputs = self.forward_outputs(images)
        hp, wp = images.tensor.shape[-2:]
        sizes = []
        for x, (h, w) in zip(batched_inputs, images.image_sizes):
            oh, ow = x.get("height", h), x.get("width", w)
            sizes.append([wp * float(ow) / w, hp * float(oh) / h])
        main = outputs.main
        l = self.eval_stage(main)
        dets = self.postprocessor(main.logits[l], main.boxes[l], torch.as_tensor(sizes, device=main.boxes.device))
        return [{"boxes": d["boxes"], "scores": d["scores"], "labels": d["labels"]} for d in dets]

    def predict(self, images: Tensor, orig_target_sizes: Tensor) -> List[Dict[str, Tensor]]:
        """The reference's eval call: ``images [B,3,H,W]`` already in the network's input space,
        ``orig_target_sizes [B,2]`` as ``(w, h)``."""
        outputs = self.forward_outputs(self.images_from_tensor(images))
        main = outputs.main
        l = self.eval_stage(main)
        return self.postprocessor(main.logits[l], main.boxes[l], orig_target_sizes)

    # ---------------------------------------------------------------------------------------
    # Reference layouts
    # ---------------------------------------------------------------------------------------
    def parity_intermediates(self, outputs: DetectorOutputs) -> Dict[str, Any]:
        """Our tensors in the layout of an RT-DETRv2 fixture's ``intermediates.pt`` (with denoising
        also its ``dn_input_query_class``, ``dn_input_query_logits``, ``dn_input_query_bbox_unact``
        and ``dn_attn_mask``)."""
        taps, main, enc = outputs.taps, outputs.main, outputs.enc
        aifi = taps.get("aifi", {})
        dn = {}
        if outputs.dn is not None:
            dn = {
                "dn_input_query_class": outputs.dn["query_class"],
                "dn_input_query_logits": outputs.dn["content"].detach(),
                "dn_input_query_bbox_unact": outputs.dn["reference_unact"],
                "dn_attn_mask": outputs.dn["attn_mask"],
            }
        return dn | {
            "backbone": list(taps["backbone"].values()),
            "aifi_input": aifi.get("aifi_input"),
            "aifi_pos_embed": aifi.get("aifi_pos_embed"),
            "aifi_output": aifi.get("aifi_output"),
            "encoder_outputs": taps["neck"],
            "memory": taps["memory"],
            "spatial_shapes": taps["spatial_shapes"].tolist(),
            "anchors": enc["anchors"],
            "valid_mask": enc["valid_mask"],
            "enc_outputs_logits": enc["all_token_logits"],
            "enc_outputs_coord_unact": enc["all_token_coords_unact"],
            "enc_topk_indices": enc["topk_indices"],
            "decoder_init_target": taps["queries"].content,
            "decoder_init_ref_points_unact": taps["init_reference_unact"],
            "decoder_ref_points": main.references.detach(),
            "decoder_hidden_states": main.hidden,
        }

    @classmethod
    def from_reference_config(cls, cfg: Mapping[str, Any], **kwargs) -> "RTDETR":
        """Build from the resolved constructor arguments of the reference's classes (a fixture's
        ``reduced_config`` or ``rtdetr_keys/_summary.json`` -> ``resolved_args``)."""
        return build_rtdetr_from_reference_config(cfg, **kwargs)


def _kwargs(cfg: Mapping[str, Any], drop=("_target_",)) -> Dict[str, Any]:
    return {k: v for k, v in cfg.items() if k not in drop and not (isinstance(v, Mapping) and "_module_" in v)}


def build_rtdetr_from_reference_config(cfg: Mapping[str, Any], with_criterion: bool = True, **kwargs) -> RTDETR:
    """:class:`RTDETR` from ``{"PResNet": {...}, "HybridEncoder": {...}, "RTDETRTransformerv2": {...},
    "HungarianMatcher": ..., "RTDETRCriterionv2": ..., "RTDETRPostProcessor": ...}`` (the reference's
    resolved constructor arguments)."""
    backbone_cfg = _kwargs(cfg["PResNet"])
    backbone_cfg["pretrained"] = False
    backbone = PResNet(**backbone_cfg)
    encoder = HybridEncoder(**_kwargs(cfg["HybridEncoder"]))
    decoder = RTDETRTransformerv2(**_kwargs(cfg["RTDETRTransformerv2"]))
    criterion = None
    if with_criterion and "RTDETRCriterionv2" in cfg:
        m = _kwargs(cfg.get("HungarianMatcher", {"weight_dict": {"cost_class": 2, "cost_bbox": 5, "cost_giou": 2}}))
        matcher = RTDETRHungarianMatcher(**m)
        c = _kwargs(cfg["RTDETRCriterionv2"])
        criterion = RTDETRCriterion(matcher=matcher, **c)
    post = None
    if "RTDETRPostProcessor" in cfg:
        post = RTDETRPostProcessor(**_kwargs(cfg["RTDETRPostProcessor"]))
    return RTDETR(backbone, encoder, decoder, criterion=criterion, postprocessor=post, **kwargs)
