"""RT-DETR's matcher, criterion (VFL + L1 + GIoU) and post-processor (docs/rt_detr.md).

Matching cost per image ``[Q, G]`` (as the reference, all in float32)::

    C = cost_bbox * |b_q - g_j|_1 + cost_class * (pos - neg)[q, c_j] - cost_giou * GIoU(xyxy(b_q), xyxy(g_j))
    p = sigmoid(z), pos = alpha (1-p)^gamma (-log(p + 1e-8)), neg = (1-alpha) p^gamma (-log(1 - p + 1e-8))

Varifocal loss of a stage, with ``iou`` the detached IoU of each matched pair and
``t [B,Q,C]`` = ``iou`` at (matched query, its GT class), 0 elsewhere::

    w = alpha * sigmoid(z).detach()^gamma * (1 - onehot) + t
    loss_vfl = sum_{b,c} mean_q BCEWithLogits(z, t, weight=w) * Q / num_boxes

``loss_bbox`` / ``loss_giou``: L1 and ``1 - GIoU`` of the matched pairs over ``num_boxes``. Every
decoder layer is matched on its own; the encoder's selected proposals (``_enc_0``) are matched and
supervised with the real labels; denoising queries (``_dn_i``) use their fixed GT slots and the
normaliser ``num_boxes * num_group``.

IoU and GIoU here have no epsilon (the reference's DETR box ops), unlike
:mod:`tprd.layers.box_ops`, whose 1e-6 follows detrex.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from ..layers.box_ops import box_area, box_cxcywh_to_xyxy
from .criterion import get_num_boxes
from .outputs import DetectorOutputs

__all__ = [
    "RTDETRHungarianMatcher",
    "RTDETRCriterion",
    "RTDETRPostProcessor",
    "rtdetr_box_iou",
    "rtdetr_generalized_box_iou",
    "LOSS_BASE_KEYS",
]

Match = Tuple[Tensor, Tensor]
LOSS_BASE_KEYS = {"vfl": ("loss_vfl",), "focal": ("loss_focal",), "boxes": ("loss_bbox", "loss_giou")}

#: The 80 COCO category ids in contiguous-label order (1..90 without the 10 unused ids), for the
#: post-processor's ``remap_mscoco_category`` (the model does not import the data catalog).
COCO_CATEGORY_IDS = tuple(i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83))


def rtdetr_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tuple[Tensor, Tensor]:
    """Pairwise IoU ``[N,M]`` and union of ``xyxy`` boxes, ``inter / union`` (no epsilon)."""
    area1, area2 = box_area(boxes1), box_area(boxes2)
    lt = torch.max(boxes1[:, None, :2], boxes2[:, :2])
    rb = torch.min(boxes1[:, None, 2:], boxes2[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[:, :, 0] * wh[:, :, 1]
    union = area1[:, None] + area2 - inter
    return inter / union, union


def rtdetr_generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise GIoU ``[N,M]`` of ``xyxy`` boxes, ``iou - (hull - union) / hull`` (no epsilon)."""
    iou, union = rtdetr_box_iou(boxes1, boxes2)
    lt = torch.min(boxes1[:, None, :2], boxes2[:, :2])
    rb = torch.max(boxes1[:, None, 2:], boxes2[:, 2:])
    wh = (rb - lt).clamp(min=0)
    hull = wh[:, :, 0] * wh[:, :, 1]
    return iou - (hull - union) / hull


# ============================================================================================
# Matcher
# ============================================================================================


class RTDETRHungarianMatcher(nn.Module):
    """Hungarian matching with RT-DETR's cost (reference ``HungarianMatcher`` arguments).

    Args:
        weight_dict: ``{"cost_class", "cost_bbox", "cost_giou"}`` (2 / 5 / 2).
        use_focal_loss: focal class cost on sigmoid scores (else ``-softmax`` probability).
        alpha, gamma: of the focal cost.
    """

    def __init__(self, weight_dict: Mapping[str, float], use_focal_loss: bool = True, alpha: float = 0.25,
                 gamma: float = 2.0):
        super().__init__()
        self.cost_class = float(weight_dict["cost_class"])
        self.cost_bbox = float(weight_dict["cost_bbox"])
        self.cost_giou = float(weight_dict["cost_giou"])
        if self.cost_class == 0 and self.cost_bbox == 0 and self.cost_giou == 0:
            raise ValueError("RTDETRHungarianMatcher: all cost weights are 0")
        self.use_focal_loss = use_focal_loss
        self.alpha = alpha
        self.gamma = gamma

    @torch.no_grad()
    def cost_matrices(self, logits: Tensor, boxes: Tensor, targets: Sequence[Dict[str, Tensor]]) -> List[Tensor]:
        """Per image the cost ``[Q, G_b]`` (float, on the CPU) that goes to the assignment."""
        bsz, nq = logits.shape[:2]
        flat_logits = logits.flatten(0, 1)
        prob = torch.sigmoid(flat_logits) if self.use_focal_loss else flat_logits.softmax(-1)
        flat_boxes = boxes.flatten(0, 1)
        tgt_ids = torch.cat([t["labels"] for t in targets]).to(logits.device)
        tgt_boxes = torch.cat([t["boxes"] for t in targets]).to(boxes.device, boxes.dtype)
        if self.use_focal_loss:
            p = prob[:, tgt_ids]
            neg = (1 - self.alpha) * (p ** self.gamma) * (-(1 - p + 1e-8).log())
            pos = self.alpha * ((1 - p) ** self.gamma) * (-(p + 1e-8).log())
            cost_class = pos - neg
        else:
            cost_class = -prob[:, tgt_ids]
        cost_bbox = torch.cdist(flat_boxes, tgt_boxes, p=1)
        cost_giou = -rtdetr_generalized_box_iou(box_cxcywh_to_xyxy(flat_boxes), box_cxcywh_to_xyxy(tgt_boxes))
        cost = self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou
        cost = cost.view(bsz, nq, -1)
        sizes = [len(t["boxes"]) for t in targets]
        return [c[i].cpu() for i, c in enumerate(cost.split(sizes, -1))]

    @torch.no_grad()
    def forward(self, logits, boxes=None, targets=None, return_costs: bool = False):
        """``(pred_idx, gt_idx)`` int64 per image (sorted by query); also accepts
        ``matcher({"pred_logits", "pred_boxes"}, targets)``. ``return_costs``: also the cost matrices."""
        if isinstance(logits, Mapping):
            logits, boxes, targets = logits["pred_logits"], logits["pred_boxes"], boxes
        costs = self.cost_matrices(logits, boxes, targets)
        matches = []
        for c in costs:
            rows, cols = linear_sum_assignment(c.numpy())
            matches.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return (matches, costs) if return_costs else matches

    @torch.no_grad()
    def match_stages(self, logits: Tensor, boxes: Tensor, targets: Sequence[Dict[str, Tensor]]) -> List[List[Match]]:
        """Match every stage of ``logits [L,B,Q,C]`` / ``boxes [L,B,Q,4]`` on its own (the interface of
        :meth:`tprd.modeling.matcher.HungarianMatcher.match_stages`)."""
        return [self(logits[l], boxes[l], targets) for l in range(logits.shape[0])]

    def extra_repr(self) -> str:
        return (f"cost_class={self.cost_class}, cost_bbox={self.cost_bbox}, cost_giou={self.cost_giou}, "
                f"use_focal_loss={self.use_focal_loss}, alpha={self.alpha}, gamma={self.gamma}")


# ============================================================================================
# Criterion
# ============================================================================================


def _src_index(indices: Sequence[Match], device) -> Tuple[Tensor, Tensor]:
    batch = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)]).to(device)
    src = torch.cat([src for src, _ in indices]).to(device)
    return batch, src


class RTDETRCriterion(nn.Module):
    """RT-DETRv2's set criterion (reference ``RTDETRCriterionv2`` arguments).

    ``forward(outputs: DetectorOutputs, targets)`` returns the UNWEIGHTED losses, named and ordered
    as the reference returns them: ``loss_vfl, loss_bbox, loss_giou`` (last decoder layer), the same
    with ``_aux_0 .. _aux_{L-2}``, ``_dn_0 .. _dn_{L-1}`` (with denoising) and ``_enc_0``.
    :meth:`weight_losses` multiplies each by ``weight_dict[base key]`` -- the reference's returned
    (weighted) dict. ``return_indices=True`` also returns the matches
    ``{"final", "aux_<i>", "enc_0", "dn"}`` (and ``"costs"``: the cost matrices by layer name).

    Args:
        matcher: :class:`RTDETRHungarianMatcher`.
        weight_dict: base-key weights ``{"loss_vfl": 1, "loss_bbox": 5, "loss_giou": 2}``.
        losses: ``["vfl", "boxes"]`` (``"focal"`` is available too).
        alpha, gamma: of VFL (0.75 / 2) or focal loss.
        num_classes: foreground classes.
        boxes_weight_format: ``None``, ``"iou"`` or ``"giou"``: weight the GIoU loss by the pair's
            (detached) IoU/GIoU, and use it as the VFL target score.
        share_matched_indices: the auxiliary layers reuse the last layer's matches.
        aux_loss: supervise the earlier layers, the encoder proposals and the denoising queries.
    """

    def __init__(self, matcher: RTDETRHungarianMatcher, weight_dict: Mapping[str, float],
                 losses: Sequence[str] = ("vfl", "boxes"), alpha: float = 0.75, gamma: float = 2.0,
                 num_classes: int = 80, boxes_weight_format: Optional[str] = None,
                 share_matched_indices: bool = False, aux_loss: bool = True):
        super().__init__()
        unknown = [l for l in losses if l not in LOSS_BASE_KEYS]
        if unknown:
            raise ValueError(f"unknown RT-DETR losses {unknown}; known: {sorted(LOSS_BASE_KEYS)}")
        if boxes_weight_format not in (None, "iou", "giou"):
            raise ValueError(f"boxes_weight_format must be None, 'iou' or 'giou', got {boxes_weight_format!r}")
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.losses = list(losses)
        self.alpha = alpha
        self.gamma = gamma
        self.num_classes = num_classes
        self.boxes_weight_format = boxes_weight_format
        self.share_matched_indices = share_matched_indices
        self.aux_loss = aux_loss

    # ---------------------------------------------------------------------------------------
    def _pair_quality(self, boxes: Tensor, targets, indices) -> Optional[Tensor]:
        if self.boxes_weight_format is None:
            return None
        idx = _src_index(indices, boxes.device)
        src = box_cxcywh_to_xyxy(boxes[idx].detach())
        tgt = box_cxcywh_to_xyxy(torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)], 0))
        if self.boxes_weight_format == "iou":
            return torch.diag(rtdetr_box_iou(src, tgt)[0])
        return torch.diag(rtdetr_generalized_box_iou(src, tgt))

    def loss_vfl(self, logits: Tensor, boxes: Tensor, targets, indices, num_boxes: float,
                 values: Optional[Tensor] = None) -> Dict[str, Tensor]:
        idx = _src_index(indices, logits.device)
        if values is None:
            src = boxes[idx]
            tgt = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)], 0)
            ious = torch.diag(rtdetr_box_iou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt))[0]).detach()
        else:
            ious = values
        classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        classes[idx] = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)]).to(logits.device)
        onehot = F.one_hot(classes, num_classes=self.num_classes + 1)[..., :-1]
        score = torch.zeros_like(classes, dtype=logits.dtype)
        score[idx] = ious.to(score.dtype)
        target_score = score.unsqueeze(-1) * onehot
        weight = self.alpha * torch.sigmoid(logits).detach().pow(self.gamma) * (1 - onehot) + target_score
        loss = F.binary_cross_entropy_with_logits(logits, target_score, weight=weight, reduction="none")
        return {"loss_vfl": loss.mean(1).sum() * logits.shape[1] / num_boxes}

    def loss_focal(self, logits: Tensor, boxes: Tensor, targets, indices, num_boxes: float,
                   **_) -> Dict[str, Tensor]:
        idx = _src_index(indices, logits.device)
        classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        classes[idx] = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)]).to(logits.device)
        onehot = F.one_hot(classes, num_classes=self.num_classes + 1)[..., :-1].to(logits.dtype)
        prob = logits.sigmoid()
        ce = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
        p_t = prob * onehot + (1 - prob) * (1 - onehot)
        loss = ce * ((1 - p_t) ** self.gamma)
        if self.alpha >= 0:
            loss = (self.alpha * onehot + (1 - self.alpha) * (1 - onehot)) * loss
        return {"loss_focal": loss.mean(1).sum() * logits.shape[1] / num_boxes}

    def loss_boxes(self, logits: Tensor, boxes: Tensor, targets, indices, num_boxes: float,
                   boxes_weight: Optional[Tensor] = None) -> Dict[str, Tensor]:
        idx = _src_index(indices, boxes.device)
        src = boxes[idx]
        tgt = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)], 0).to(src.dtype)
        loss_bbox = F.l1_loss(src, tgt, reduction="none").sum() / num_boxes
        giou = torch.diag(rtdetr_generalized_box_iou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt)))
        loss_giou = 1 - giou
        if boxes_weight is not None:
            loss_giou = loss_giou * boxes_weight
        return {"loss_bbox": loss_bbox, "loss_giou": loss_giou.sum() / num_boxes}

    def stage_losses(self, logits: Tensor, boxes: Tensor, targets, indices, num_boxes: float,
                     suffix: str = "") -> Dict[str, Tensor]:
        """The configured losses of one set of predictions ``[B,Q,C]`` / ``[B,Q,4]`` and its matches."""
        out: Dict[str, Tensor] = {}
        quality = self._pair_quality(boxes, targets, indices)
        for name in self.losses:
            if name == "vfl":
                terms = self.loss_vfl(logits, boxes, targets, indices, num_boxes, values=quality)
            elif name == "focal":
                terms = self.loss_focal(logits, boxes, targets, indices, num_boxes)
            else:
                terms = self.loss_boxes(logits, boxes, targets, indices, num_boxes, boxes_weight=quality)
            out.update({k + suffix: v for k, v in terms.items()})
        return out

    @staticmethod
    def dn_indices(dn_meta: Mapping[str, Any], targets) -> List[Match]:
        """Fixed denoising matches: positive slots of every group <-> ``arange(G_b)`` tiled."""
        out = []
        for i, t in enumerate(targets):
            n = len(t["labels"])
            pos = dn_meta["dn_positive_idx"][i]
            if n > 0:
                gt = torch.arange(n, dtype=torch.int64, device=pos.device).tile(dn_meta["dn_num_group"])
                out.append((pos, gt))
            else:
                empty = torch.zeros(0, dtype=torch.int64, device=pos.device)
                out.append((empty, empty.clone()))
        return out

    def forward(self, outputs: DetectorOutputs, targets: Sequence[Dict[str, Tensor]],
                return_indices: bool = False, return_costs: bool = False):
        main = outputs.main
        num_stages = main.logits.shape[0]
        num_boxes = get_num_boxes(targets, main.logits.device)
        losses: Dict[str, Tensor] = {}
        matches: Dict[str, Any] = {}
        costs: Dict[str, Any] = {}

        def match(name, logits, boxes):
            m, c = self.matcher(logits, boxes, targets, return_costs=True)
            matches[name], costs[name] = m, c
            return m

        final = match("final", main.logits[-1], main.boxes[-1])
        losses.update(self.stage_losses(main.logits[-1], main.boxes[-1], targets, final, num_boxes))
        if self.aux_loss:
            for i in range(num_stages - 1):
                idx = final if self.share_matched_indices else match(f"aux_{i}", main.logits[i], main.boxes[i])
                if self.share_matched_indices:
                    matches[f"aux_{i}"] = final
                losses.update(self.stage_losses(main.logits[i], main.boxes[i], targets, idx, num_boxes,
                                                f"_aux_{i}"))
            dn = outputs.dn
            if dn:
                preds, meta = dn["predictions"], dn["dn_meta"]
                idx = self.dn_indices(meta, targets)
                matches["dn"] = idx
                dn_boxes = num_boxes * meta["dn_num_group"]
                for i in range(preds.logits.shape[0]):
                    losses.update(self.stage_losses(preds.logits[i], preds.boxes[i], targets, idx, dn_boxes,
                                                    f"_dn_{i}"))
            enc = outputs.enc
            if enc is not None:
                idx = match("enc_0", enc["pred_logits"], enc["pred_boxes"])
                enc_targets, saved = targets, self.num_classes
                if enc.get("class_agnostic", False):
                    enc_targets = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
                    self.num_classes = 1
                try:
                    losses.update(self.stage_losses(enc["pred_logits"], enc["pred_boxes"], enc_targets, idx,
                                                    num_boxes, "_enc_0"))
                finally:
                    self.num_classes = saved
        if return_costs:
            matches["costs"] = costs
        return (losses, matches) if return_indices else losses

    def base_key(self, key: str) -> str:
        for marker in ("_aux_", "_dn_", "_enc_"):
            if marker in key:
                return key[: key.index(marker)]
        return key

    def weight_losses(self, losses: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        """Each loss times ``weight_dict`` of its base key (``loss_vfl_aux_1`` -> ``loss_vfl``);
        losses without a weight are dropped, as the reference does."""
        out = {}
        for k, v in losses.items():
            base = self.base_key(k)
            if base in self.weight_dict:
                out[k] = v * self.weight_dict[base]
        return out


# ============================================================================================
# Post-processor
# ============================================================================================


class RTDETRPostProcessor(nn.Module):
    """Top-``num_top_queries`` (query, class) pairs per image (reference ``RTDETRPostProcessor``).

    ``forward(logits [B,Q,C], boxes [B,Q,4] normalised cxcywh, orig_target_sizes [B,2] (w, h))`` ->
    per image ``{"labels", "boxes" (xyxy pixels of the original size, not clipped), "scores",
    "queries"}``. With ``use_focal_loss`` the scores are sigmoids ranked over all pairs (a query may
    appear with several labels); otherwise softmax without the last (no-object) column, best class per
    query. ``remap_mscoco_category``: map labels 0..79 to COCO category ids.
    """

    def __init__(self, num_classes: int = 80, use_focal_loss: bool = True, num_top_queries: int = 300,
                 remap_mscoco_category: bool = False):
        super().__init__()
        self.num_classes = int(num_classes)
        self.use_focal_loss = use_focal_loss
        self.num_top_queries = num_top_queries
        self.remap_mscoco_category = remap_mscoco_category

    def forward(self, logits: Tensor, boxes: Tensor, orig_target_sizes: Tensor) -> List[Dict[str, Tensor]]:
        sizes = torch.as_tensor(orig_target_sizes, device=boxes.device)
        xyxy = box_cxcywh_to_xyxy(boxes) * sizes.repeat(1, 2).unsqueeze(1).to(boxes.dtype)
        if self.use_focal_loss:
            k = min(self.num_top_queries, logits.shape[1] * logits.shape[2])
            scores, index = torch.topk(torch.sigmoid(logits).flatten(1), k, dim=-1)
            labels = index - index // self.num_classes * self.num_classes
            queries = index // self.num_classes
            xyxy = xyxy.gather(1, queries.unsqueeze(-1).repeat(1, 1, 4))
        else:
            scores, labels = F.softmax(logits, dim=-1)[:, :, :-1].max(-1)
            queries = torch.arange(xyxy.shape[1], device=xyxy.device).unsqueeze(0).tile([xyxy.shape[0], 1])
            if scores.shape[1] > self.num_top_queries:
                scores, queries = torch.topk(scores, self.num_top_queries, dim=-1)
                labels = labels.gather(1, queries)
                xyxy = xyxy.gather(1, queries.unsqueeze(-1).tile(1, 1, 4))
        if self.remap_mscoco_category:
            labels = torch.as_tensor(COCO_CATEGORY_IDS, device=labels.device)[labels]
        return [{"labels": l, "boxes": b, "scores": s, "queries": q}
                for l, b, s, q in zip(labels, xyxy, scores, queries)]

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, use_focal_loss={self.use_focal_loss}, "
                f"num_top_queries={self.num_top_queries}")
