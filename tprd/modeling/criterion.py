"""Set-prediction losses of the DETR family (detrex ``SetCriterion`` / ``DeformableCriterion``).

For matched pairs ``(q, j)`` of one decoder stage::

    loss_class = sum_{b,c} mean_q focal(z[b,q,c], onehot[b,q,c]) / num_boxes * Q
    loss_bbox  = sum_pairs |b_q - g_j|_1 / num_boxes
    loss_giou  = sum_pairs (1 - GIoU(xyxy(b_q), xyxy(g_j))) / num_boxes

with the sigmoid focal loss ``(alpha t + (1-alpha)(1-t)) * BCE(z, t) * (1 - p_t)^gamma`` and
``num_boxes`` the batch's ground-truth count, averaged over processes, at least 1. The stage terms
are computed for all stages at once; the final stage gets the plain names, stage ``l < L-1`` the
suffix ``_l``, two-stage encoder proposals the suffix ``_enc``. The criterion returns UNWEIGHTED
losses; :meth:`SetCriterion.weight_losses` applies ``weight_dict``.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers.box_ops import box_cxcywh_to_xyxy, paired_generalized_box_iou
from .matcher import HungarianMatcher, Match
from .outputs import DetectorOutputs, StagePredictions

__all__ = [
    "SetCriterion",
    "sigmoid_focal_loss",
    "loss_labels",
    "loss_boxes",
    "get_num_boxes",
    "stage_suffix",
]

Matches = Sequence[Match]


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Elementwise sigmoid focal loss (RetinaNet), same shape as ``logits``."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * ((1 - p_t) ** gamma)
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss


def get_num_boxes(targets: Sequence[Dict[str, Tensor]], device=None) -> float:
    """Ground-truth boxes in the batch, summed over processes and divided by the world size, >= 1."""
    n = float(sum(int(t["labels"].shape[0]) for t in targets))
    if dist.is_available() and dist.is_initialized():
        t = torch.as_tensor([n], dtype=torch.float, device=device)
        dist.all_reduce(t)
        n = t.item() / dist.get_world_size()
    return max(n, 1.0)


def _flat_index(indices_per_stage: Sequence[Matches], device):
    """Concatenate matches of all stages: (stage, batch, query, gt) index vectors."""
    stage, batch, query, gt = [], [], [], []
    for l, matches in enumerate(indices_per_stage):
        for b, (src, tgt) in enumerate(matches):
            stage.append(torch.full_like(src, l))
            batch.append(torch.full_like(src, b))
            query.append(src)
            gt.append(tgt)
    if not query:
        e = torch.empty(0, dtype=torch.int64, device=device)
        return e, e, e, e
    return tuple(torch.cat(x).to(device) for x in (stage, batch, query, gt))


def _gather_targets(targets, batch: Tensor, gt: Tensor, key: str, device) -> Tensor:
    """``targets[batch[i]][key][gt[i]]`` for every i, without a Python loop over pairs."""
    sizes = [int(t["labels"].shape[0]) for t in targets]
    offsets = torch.tensor([0] + sizes[:-1], dtype=torch.int64).cumsum(0).to(device)
    flat = torch.cat([t[key] for t in targets]).to(device)
    return flat[offsets[batch] + gt]


def loss_labels(
    logits: Tensor,
    targets: Sequence[Dict[str, Tensor]],
    indices,
    num_boxes: float,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> Tensor:
    """Focal classification loss, detrex normalisation ``l.mean(queries).sum() / num_boxes * Q``.

    ``logits [B,Q,C]`` with ``indices`` per image -> scalar; or ``logits [L,B,Q,C]`` with
    ``indices`` per stage (list of per-image matches) -> ``[L]``. Unmatched queries have all-zero
    targets.
    """
    staged = logits.dim() == 4
    logits = logits.float()  # losses in fp32 under mixed precision (AMP gives half-precision logits)
    if not staged:
        logits, indices = logits[None], [indices]
    nl, bsz, nq, nc = logits.shape
    stage, batch, query, gt = _flat_index(indices, logits.device)
    onehot = torch.zeros_like(logits)
    if query.numel():
        labels = _gather_targets(targets, batch, gt, "labels", logits.device)
        onehot[stage, batch, query, labels] = 1.0
    loss = sigmoid_focal_loss(logits, onehot, alpha, gamma)
    loss = loss.mean(2).flatten(1).sum(1) / num_boxes * nq
    return loss if staged else loss[0]


def loss_boxes(
    boxes: Tensor, targets: Sequence[Dict[str, Tensor]], indices, num_boxes: float
) -> Dict[str, Tensor]:
    """L1 and GIoU losses of matched boxes (normalised cxcywh), summed and divided by ``num_boxes``.

    ``boxes [B,Q,4]`` with per-image ``indices`` -> scalars; ``boxes [L,B,Q,4]`` with per-stage
    ``indices`` -> ``[L]`` tensors. Returns ``{"loss_bbox", "loss_giou"}``.
    """
    staged = boxes.dim() == 4
    boxes = boxes.float()  # losses in fp32 under mixed precision (AMP gives half-precision boxes)
    if not staged:
        boxes, indices = boxes[None], [indices]
    nl = boxes.shape[0]
    stage, batch, query, gt = _flat_index(indices, boxes.device)
    src = boxes[stage, batch, query]
    if query.numel():
        tgt = _gather_targets(targets, batch, gt, "boxes", boxes.device).to(src.dtype)
    else:
        tgt = src.detach()
    l1 = F.l1_loss(src, tgt, reduction="none").sum(-1)
    giou = 1 - paired_generalized_box_iou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt))
    # per-stage sums; a zero that keeps the graph when a stage has no pairs
    zeros = (boxes.sum() * 0.0).repeat(nl)
    loss_bbox = zeros.index_add(0, stage, l1) / num_boxes
    loss_giou = zeros.index_add(0, stage, giou) / num_boxes
    if not staged:
        loss_bbox, loss_giou = loss_bbox[0], loss_giou[0]
    return {"loss_bbox": loss_bbox, "loss_giou": loss_giou}


def stage_suffix(l: int, num_stages: int) -> str:
    """Loss-key suffix of stage ``l`` (0-based): ``""`` for the final stage, ``"_l"`` otherwise."""
    return "" if l == num_stages - 1 else f"_{l}"


class SetCriterion(nn.Module):
    """GT losses of the main query group at every decoder stage (+ two-stage encoder proposals).

    ``forward(outputs, targets)`` accepts :class:`DetectorOutputs`, :class:`StagePredictions` or a
    detrex-style dict (``pred_logits``, ``pred_boxes``, ``aux_outputs``, ``enc_outputs``) and
    returns UNWEIGHTED losses with detrex's names and order: ``loss_class, loss_bbox, loss_giou``,
    then ``_0`` .. ``_{L-2}``, then ``_enc``. ``two_stage_binary_cls``: match and supervise the
    encoder proposals as one class (all labels 0), as detrex's Deformable DETR does.
    """

    def __init__(
        self,
        num_classes: int,
        matcher: Optional[HungarianMatcher] = None,
        weight_dict: Optional[Dict[str, float]] = None,
        alpha: float = 0.25,
        gamma: float = 2.0,
        two_stage_binary_cls: bool = False,
        aux_loss: bool = True,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher if matcher is not None else HungarianMatcher(alpha=alpha, gamma=gamma)
        self.weight_dict = dict(weight_dict) if weight_dict is not None else {}
        self.alpha = alpha
        self.gamma = gamma
        self.two_stage_binary_cls = two_stage_binary_cls
        self.aux_loss = aux_loss

    # reusable terms ---------------------------------------------------------------------------
    def loss_labels(self, logits: Tensor, targets, indices, num_boxes: float) -> Tensor:
        return loss_labels(logits, targets, indices, num_boxes, self.alpha, self.gamma)

    def loss_boxes(self, boxes: Tensor, targets, indices, num_boxes: float) -> Dict[str, Tensor]:
        return loss_boxes(boxes, targets, indices, num_boxes)

    def weight_losses(self, loss_dict: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """Multiply each entry by ``weight_dict[key]`` (entries without a weight are kept as they are)."""
        return {k: v * self.weight_dict[k] if k in self.weight_dict else v for k, v in loss_dict.items()}

    # main entry -------------------------------------------------------------------------------
    @staticmethod
    def _unpack(outputs):
        if isinstance(outputs, DetectorOutputs):
            return outputs.main.logits, outputs.main.boxes, outputs.enc
        if isinstance(outputs, StagePredictions):
            return outputs.logits, outputs.boxes, None
        stages = list(outputs.get("aux_outputs", [])) + [outputs]
        logits = torch.stack([s["pred_logits"] for s in stages])
        boxes = torch.stack([s["pred_boxes"] for s in stages])
        return logits, boxes, outputs.get("enc_outputs")

    def forward(self, outputs, targets: Sequence[Dict[str, Tensor]], return_indices: bool = False):
        """Losses (unweighted); with ``return_indices`` also ``{"stages": [L][B] matches, "enc": ...}``."""
        logits, boxes, enc = self._unpack(outputs)
        if not self.aux_loss:
            logits, boxes = logits[-1:], boxes[-1:]
        num_stages = logits.shape[0]
        num_boxes = get_num_boxes(targets, logits.device)
        indices = self.matcher.match_stages(logits.detach(), boxes.detach(), targets)
        cls = self.loss_labels(logits, targets, indices, num_boxes)
        box = self.loss_boxes(boxes, targets, indices, num_boxes)
        losses: Dict[str, Tensor] = {}
        for l in [num_stages - 1] + list(range(num_stages - 1)):
            s = stage_suffix(l, num_stages)
            losses["loss_class" + s] = cls[l]
            losses["loss_bbox" + s] = box["loss_bbox"][l]
            losses["loss_giou" + s] = box["loss_giou"][l]
        enc_indices = None
        if enc is not None and enc.get("pred_logits") is not None:
            enc_targets = targets
            if self.two_stage_binary_cls:
                enc_targets = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
            enc_indices = self.matcher(enc["pred_logits"].detach(), enc["pred_boxes"].detach(), enc_targets)
            losses["loss_class_enc"] = self.loss_labels(enc["pred_logits"], enc_targets, enc_indices, num_boxes)
            enc_box = self.loss_boxes(enc["pred_boxes"], enc_targets, enc_indices, num_boxes)
            losses["loss_bbox_enc"] = enc_box["loss_bbox"]
            losses["loss_giou_enc"] = enc_box["loss_giou"]
        if return_indices:
            return losses, {"stages": indices, "enc": enc_indices}
        return losses

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, alpha={self.alpha}, gamma={self.gamma}, "
            f"two_stage_binary_cls={self.two_stage_binary_cls}"
        )
