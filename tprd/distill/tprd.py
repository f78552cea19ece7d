"""TPRD: teacher prediction refinement and the decoupled classification KD paired with it.

docs/methods.md#tprd. Everything here is a pure function of tensors:

* :func:`refine_teacher_predictions` (contract) -- refined per-stage teacher logits and boxes
  (docs/methods.md#tprd-refinement), vectorised over target stages, source stages, images and queries.
* :func:`refinement_stats` / ``return_stats=True`` -- per-stage share of refined positives and of
  suppressed negatives, for logging.
* :func:`decoupled_kd` -- TPRD-CKD (#tprd-ckd), per aligned pair, numerically stable.
* :func:`build_match_index`, :func:`pad_ground_truth`, :func:`aligned_positive_targets` -- the
  per-(stage, image, query) "matched GT" index tensor and the lookups that turn it into the
  positive flag / target class of aligned pairs (#tprd-alignment).

Selection rules (#tprd-refinement), for target stage ``l`` and query ``q`` (source stages ``k ≤ l``):

* positive (matched to GT ``j`` of class ``c``, box ``g``): ``K+ = {k : IoU(X^k_q, g) > IoU(X^l_q, g)
  and σ(Z^k_q[c]) > σ(Z^l_q[c])}``; ``k*`` = largest IoU, lowest ``k`` on ties; the whole box and only
  logit ``c`` are copied from ``k*``.
* negative: ``V = {k : argmax Z^k_q = a_l and max Z^k_q < max Z^l_q}``; ``k*`` = argmin of the max
  logit (lowest ``k`` on ties); only logit ``a_l`` is copied from ``k*``.

Implementation: the positives are handled as a packed list (one entry per matched (l, b, q),
taken straight from ``matches``), with ``[L(source), P]`` tables of IoU and GT-class logit; the
negatives are dense, with ``[L(target), L(source), B, Q]`` comparisons masked to ``k ≤ l``; the
result is written with one scatter (negatives) and one indexed assignment (positives). Ties are
broken explicitly (``amin`` of the stage index over the candidates), so the choice is the lowest
stage on every device. At L=6, B=8, Q=900, C=80 this takes ~3 ms on 2 CPU threads
(``benchmarks/tprd_refine.md``).

The score criterion ``σ(z_k) > σ(z_l)`` is evaluated as ``z_k > z_l``: σ is strictly increasing,
so this is the exact-arithmetic meaning of the rule. It deliberately avoids comparing rounded
sigmoids: float32 σ rounds to 1.0 for ``z ≳ 16.6`` (so two different confident logits would
"tie"), and the CPU sigmoid kernel's vector and scalar paths may differ by one ulp for *equal*
inputs, which would break ties non-deterministically. The two criteria only differ for GT-class
logits above ≈ 16.6 at stage ``l``.
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from tprd.distill.losses import _at_least_float32, kl_div_log_probs
from tprd.layers.box_ops import box_cxcywh_to_xyxy, paired_box_iou

__all__ = [
    "refine_teacher_predictions",
    "refinement_stats",
    "build_match_index",
    "pad_ground_truth",
    "aligned_positive_targets",
    "decoupled_kd",
    "sigmoid_decoupled_kd",
    "tprd_class_kd",
    "CLASS_KD_FORMS",
]

Match = Tuple[Tensor, Tensor]

# Box used for padded GT slots and for negatives' "matched GT": positive area, so IoUs stay finite.
_DUMMY_BOX = (0.5, 0.5, 1.0, 1.0)


# ----------------------------------------------------------------------------------------------
# Ground truth and matches as dense tensors
# ----------------------------------------------------------------------------------------------
def pad_ground_truth(
    gt_labels: Sequence[Tensor], gt_boxes: Sequence[Tensor], device=None, dtype=None
) -> Tuple[Tensor, Tensor, Tensor]:
    """Pad per-image GT into ``labels [B,G]`` (−1 on padding), ``boxes [B,G,4]`` (a dummy unit
    box on padding) and ``num_gt [B]`` (long), with ``G = max(1, max_b G_b)``."""
    if len(gt_labels) != len(gt_boxes):
        raise ValueError(f"gt_labels has {len(gt_labels)} images but gt_boxes has {len(gt_boxes)}")
    batch = len(gt_labels)
    if device is None:
        device = gt_boxes[0].device if batch else torch.device("cpu")
    if dtype is None:
        dtype = gt_boxes[0].dtype if batch else torch.float32
    counts = [int(lbl.numel()) for lbl in gt_labels]
    for b, (lbl, box) in enumerate(zip(gt_labels, gt_boxes)):
        if box.shape != (lbl.numel(), 4):
            raise ValueError(f"image {b}: gt_boxes shape {tuple(box.shape)} does not match {lbl.numel()} labels")
    gmax = max([1] + counts)
    num_gt = torch.tensor(counts, dtype=torch.long, device=device)
    valid = torch.arange(gmax, device=device) < num_gt[:, None]  # [B, G]
    labels = torch.full((batch, gmax), -1, dtype=torch.long, device=device)
    boxes = torch.tensor(_DUMMY_BOX, dtype=dtype, device=device).repeat(batch, gmax, 1)
    if sum(counts):
        labels[valid] = torch.cat([lbl.reshape(-1) for lbl in gt_labels]).to(device=device, dtype=torch.long)
        boxes[valid] = torch.cat([box.reshape(-1, 4) for box in gt_boxes]).to(device=device, dtype=dtype)
    return labels, boxes, num_gt


def _packed_matches(matches, num_queries: int, num_gt, device):
    """Concatenate ``matches[l][b] = (query_idx, gt_idx)`` into four long tensors
    ``(stage, image, query, gt)`` on ``device``, with range checks."""
    num_stages = len(matches)
    if num_stages == 0:
        raise ValueError("matches must hold one list per stage")
    batch = len(matches[0])
    if any(len(m) != batch for m in matches):
        raise ValueError(f"every stage of matches must hold {batch} images: got {[len(m) for m in matches]}")
    flat = [pair for stage in matches for pair in stage]
    counts = [int(q.numel()) for q, _ in flat]
    if counts != [int(j.numel()) for _, j in flat]:
        raise ValueError("each match must hold as many query indices as GT indices")
    if sum(counts) == 0:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return num_stages, batch, (empty, empty, empty, empty)
    # Concatenate where the matches live (normally the CPU, straight from scipy): the range check
    # then costs no device synchronisation, and one transfer per tensor moves the indices.
    src = flat[0][0].device
    q_all = torch.cat([q.reshape(-1).to(src) for q, _ in flat]).long()
    j_all = torch.cat([j.reshape(-1).to(src) for _, j in flat]).long()
    row = torch.repeat_interleave(torch.arange(num_stages * batch, device=src), torch.tensor(counts, device=src))
    bad = (j_all < 0) | (q_all < 0) | (q_all >= num_queries)
    if num_gt is not None:
        bad |= j_all >= torch.as_tensor(num_gt).to(src)[row % batch]
    if bool(bad.any()):
        raise ValueError("matches reference a query or GT index out of range for their image")
    packed = torch.stack([row // batch, row % batch, q_all, j_all]).to(device)
    return num_stages, batch, tuple(packed.unbind(0))


def build_match_index(
    matches: Sequence[Sequence[Match]], num_queries: int, device=None, num_gt=None
) -> Tensor:
    """Dense matched-GT index ``[L,B,Q]`` (long): ``j`` where query ``q`` of image ``b`` is matched
    to GT ``j`` at stage ``l``, −1 elsewhere. ``matches[l][b] = (query_idx, gt_idx)``.

    The only Python iteration is over the ``L·B`` input lists (concatenation); the indices are
    written with one scatter. With ``num_gt`` (``[B]`` ints or tensor) the GT indices are
    range-checked too (query indices always are).
    """
    device = torch.device("cpu") if device is None else device
    num_stages, batch, (stage, image, query, gt) = _packed_matches(matches, num_queries, num_gt, device)
    index = torch.full((num_stages, batch, num_queries), -1, dtype=torch.long, device=device)
    index[stage, image, query] = gt
    return index


def aligned_positive_targets(
    match_index: Tensor, gt_labels_padded: Tensor, teacher_idx: Tensor | None = None
) -> Tuple[Tensor, Tensor]:
    """Positive flag and GT class of aligned pairs (docs/methods.md#tprd-alignment).

    Args:
        match_index: ``[B, Qt]`` matched-GT index of the teacher queries at one stage (a slice of
            :func:`build_match_index`), −1 for negatives.
        gt_labels_padded: ``[B, G]`` from :func:`pad_ground_truth`.
        teacher_idx: optional ``[B, P]`` teacher query of each aligned position (e.g. the soft
            matcher's permutation ``π`` stacked over images). ``None`` = identity alignment.

    Returns:
        ``positive [B, P]`` bool and ``target_class [B, P]`` long (0 for negatives).
    """
    idx = match_index if teacher_idx is None else match_index.gather(1, teacher_idx.to(match_index.device))
    positive = idx >= 0
    cls = gt_labels_padded.gather(1, idx.clamp(min=0))
    return positive, torch.where(positive, cls, torch.zeros_like(cls))


# ----------------------------------------------------------------------------------------------
# Refinement
# ----------------------------------------------------------------------------------------------
def _refine(logits, boxes, matches, gt_labels, gt_boxes, skip_empty_images, with_sources):
    num_stages, batch, num_queries, num_classes = logits.shape
    if boxes.shape != (num_stages, batch, num_queries, 4):
        raise ValueError(f"boxes must have shape {(num_stages, batch, num_queries, 4)}, got {tuple(boxes.shape)}")
    if len(matches) != num_stages:
        raise ValueError(f"matches has {len(matches)} stages but logits has {num_stages}")
    if len(gt_labels) != batch or len(gt_boxes) != batch:
        raise ValueError(f"gt_labels / gt_boxes have {len(gt_labels)} / {len(gt_boxes)} images but logits has {batch}")
    device = logits.device
    counts = [int(lbl.numel()) for lbl in gt_labels]
    stage = torch.arange(num_stages, device=device)

    # Positives as a packed list (one entry per matched (l, b, q)); negatives are dense [L,B,Q].
    _, _, (p_stage, p_image, p_query, p_gt) = _packed_matches(matches, num_queries, counts, device)
    positive = torch.zeros(num_stages, batch, num_queries, dtype=torch.bool, device=device)
    positive[p_stage, p_image, p_query] = True
    negative = ~positive
    if skip_empty_images:
        has_gt = torch.tensor([n > 0 for n in counts], dtype=torch.bool, device=device)
        negative &= has_gt[None, :, None]

    # ---- positives: [L(source), P] tables ------------------------------------------------------
    num_pos = p_stage.numel()
    if num_pos:
        offsets = torch.tensor([0] + counts[:-1], device=device).cumsum(0)
        flat_gt = offsets[p_image] + p_gt
        cls = torch.cat([lbl.reshape(-1) for lbl in gt_labels]).to(device=device, dtype=torch.long)[flat_gt]
        gt_box = torch.cat([box.reshape(-1, 4) for box in gt_boxes]).to(device=device, dtype=boxes.dtype)[flat_gt]
        src_boxes = boxes[:, p_image, p_query]  # [L, P, 4]
        iou = paired_box_iou(box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(gt_box)[None])  # [L, P]
        cls_logit = logits[:, p_image, p_query, cls]  # [L, P], GT-class logit of every stage
        col = torch.arange(num_pos, device=device)
        cur_iou, cur_logit = iou[p_stage, col], cls_logit[p_stage, col]
        better = (stage[:, None] <= p_stage[None]) & (iou > cur_iou) & (cls_logit > cur_logit)
        best_iou = torch.where(better, iou, torch.full_like(iou, float("-inf"))).amax(0)
        # lowest source stage reaching the best IoU among the better ones (num_stages = none)
        k_pos = torch.where(better & (iou == best_iou), stage[:, None], num_stages).amin(0)
        pos_refined = k_pos < num_stages
        k_pos = torch.where(pos_refined, k_pos, p_stage)
    else:
        k_pos = pos_refined = None

    # ---- negatives: pairwise over (target stage l, source stage k) ------------------------------
    # least = min of m_k over S = {k <= l : a_k = a_l}. S contains l itself, so V = {k in S : m_k < m_l}
    # is non-empty iff least < m_l, and then min over V = least (same lowest k on ties).
    max_logit, arg = logits.max(-1)  # [L,B,Q]; first maximal index on ties
    same = (stage[None, :] <= stage[:, None])[:, :, None, None] & (arg[None, :] == arg[:, None])  # [L(t),L(s),B,Q]
    src_max = max_logit[None].expand(num_stages, -1, -1, -1)
    least = src_max.masked_fill(~same, float("inf")).amin(1)  # [L,B,Q]
    neg_refined = negative & (least < max_logit)
    # Z^{k*}[q, a_l] = max Z^{k*}[q] because k* predicts the same class a_l; unrefined rows (and
    # positives) write their own value back.
    neg_value = torch.where(neg_refined, least, max_logit)
    if with_sources:
        k_neg = torch.where(same & (src_max == least[:, None]), stage[None, :, None, None], num_stages).amin(1)
        neg_source = torch.where(neg_refined, k_neg, -1)

    # ---- write ------------------------------------------------------------------------------
    new_logits = logits.clone().scatter_(-1, arg[..., None], neg_value[..., None])
    new_boxes = boxes.clone()
    if with_sources:
        pos_source = torch.full((num_stages, batch, num_queries), -1, dtype=torch.long, device=device)
    if num_pos:
        new_logits[p_stage, p_image, p_query, cls] = cls_logit[k_pos, col]
        new_boxes[p_stage, p_image, p_query] = src_boxes[k_pos, col]
        if with_sources:
            pos_source[p_stage, p_image, p_query] = torch.where(pos_refined, k_pos, -1)

    if not with_sources:
        return new_logits, new_boxes, None
    pos_count = torch.zeros(num_stages, dtype=torch.long, device=device)
    if num_pos:
        pos_count.index_add_(0, p_stage, pos_refined.long())
    stats = {
        "num_positive": positive.sum((1, 2)),
        "num_negative": negative.sum((1, 2)),
        "positive_refined": pos_count,
        "negative_refined": neg_refined.sum((1, 2)),
        "positive_source_stage": pos_source,
        "negative_source_stage": neg_source,
    }
    return new_logits, new_boxes, stats


def _stats_summary(raw: Dict[str, Tensor]) -> Dict[str, Tensor]:
    n_pos = raw["num_positive"]
    n_neg = raw["num_negative"]
    return {
        "positive_refined_frac": raw["positive_refined"].float() / n_pos.clamp(min=1).float(),
        "negative_refined_frac": raw["negative_refined"].float() / n_neg.clamp(min=1).float(),
        "num_positive": n_pos,
        "num_negative": n_neg,
        "num_positive_refined": raw["positive_refined"],
        "num_negative_refined": raw["negative_refined"],
        "positive_source_stage": raw["positive_source_stage"],
        "negative_source_stage": raw["negative_source_stage"],
    }


@torch.no_grad()
def refine_teacher_predictions(logits: Tensor, boxes: Tensor, matches: Sequence[Sequence[Match]],
                               gt_labels: Sequence[Tensor], gt_boxes: Sequence[Tensor], skip_empty_images: bool = False,
                               return_stats: bool = False):
    """Refine every teacher stage with better predictions of the same query at stages ``1..l``.

    Args:
        logits: ``[L, B, Q, C]`` teacher class logits per stage (index ``L−1`` = final stage).
        boxes: ``[L, B, Q, 4]`` teacher boxes, normalised cxcywh.
        matches: ``matches[l][b] = (query_idx, gt_idx)`` long tensors, the B1 Hungarian match of
            the raw stage-``l`` predictions of image ``b`` to its GT (any device).
        gt_labels: per image ``[G_b]`` long class indices.
        gt_boxes: per image ``[G_b, 4]`` normalised cxcywh.
        skip_empty_images: ``False`` (default, clean behaviour of docs/methods.md#diff-5): every query of an image
            without GT is a negative and gets the negative rule. ``True``: such images are left
            unchanged, as in the reference.
        return_stats: also return :func:`refinement_stats`-style diagnostics.

    Returns:
        ``(logits, boxes)`` -- new tensors of the input shapes and dtypes (the inputs are not
        modified), or ``(logits, boxes, stats)`` with ``return_stats=True`` where ``stats`` holds,
        per stage ``[L]``: ``positive_refined_frac`` / ``negative_refined_frac`` (float32 share of
        positives whose box+GT logit were replaced / negatives whose top logit was lowered; 0 when
        a stage has none), the counts ``num_positive``, ``num_negative``, ``num_positive_refined``,
        ``num_negative_refined``, and ``positive_source_stage`` / ``negative_source_stage``
        ``[L,B,Q]`` (0-based stage ``k*`` that was borrowed from, −1 where nothing was replaced).
        All tensors live on the logits' device (no host synchronisation).
    """
    new_logits, new_boxes, raw = _refine(logits, boxes, matches, gt_labels, gt_boxes, skip_empty_images, return_stats)
    if return_stats:
        return new_logits, new_boxes, _stats_summary(raw)
    return new_logits, new_boxes


@torch.no_grad()
def refinement_stats(logits: Tensor, boxes: Tensor, matches: Sequence[Sequence[Match]], gt_labels: Sequence[Tensor],
                     gt_boxes: Sequence[Tensor], skip_empty_images: bool = False) -> Dict[str, Tensor]:
    """Diagnostics of :func:`refine_teacher_predictions` only (see its ``return_stats``)."""
    return _stats_summary(_refine(logits, boxes, matches, gt_labels, gt_boxes, skip_empty_images, True)[2])


# ----------------------------------------------------------------------------------------------
# TPRD-CKD
# ----------------------------------------------------------------------------------------------
def _non_target(x: Tensor, target: Tensor) -> Tensor:
    """Columns of ``x [P, C]`` other than ``target [P]``, in order: ``[P, C−1]``."""
    num_classes = x.shape[-1]
    cols = torch.arange(num_classes - 1, device=x.device)
    cols = cols[None, :] + (cols[None, :] >= target[:, None]).long()
    return x.gather(-1, cols)


def _pair_logits(student_logits: Tensor, teacher_logits: Tensor) -> Tuple[Tensor, Tensor]:
    """Checked ``[P,C]`` student logits (float32 or wider) and the detached teacher logits in that dtype."""
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(
            f"expected equal [P,C] logits, got {tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    s = _at_least_float32(student_logits)
    return s, teacher_logits.detach().to(s.dtype)


def decoupled_kd(student_logits: Tensor, teacher_logits: Tensor, positive_mask: Tensor, target_class: Tensor,
                 alpha: float = 1.0, beta: float = 1.0) -> Tensor:
    """TPRD-CKD per aligned (student row, refined-teacher row) pair, temperature 1 (docs/methods.md#tprd-ckd).

    With ``p = softmax(student)``, ``r = softmax(teacher)`` over the ``C`` classes:

    * positive pair with target class ``c``: ``α·TCKD + β·NCKD`` where
      ``TCKD = r_c log(r_c/p_c) + (1−r_c) log((1−r_c)/(1−p_c))`` and
      ``NCKD = KL(softmax(t without c) ‖ softmax(s without c))`` over the ``C−1`` other logits;
    * negative pair: ``KL(r ‖ p)`` over all ``C`` classes.

    ``log p_c`` comes from ``log_softmax`` and ``log(1−p_c) = logsumexp(s without c) −
    logsumexp(s)``, so nothing saturates to ``log 0`` for finite logits; zero teacher
    probabilities contribute 0. With ``C = 2`` NCKD is exactly 0.

    Args:
        student_logits, teacher_logits: ``[P, C]`` (teacher treated as a constant).
        positive_mask: ``[P]`` bool.
        target_class: ``[P]`` long; ignored (may be −1) where ``positive_mask`` is False.

    Returns:
        per-pair loss ``[P]`` (float32 or wider); the caller aggregates (Σ/(B·N), B5 weights, mean).
    """
    s, t = _pair_logits(student_logits, teacher_logits)
    positive_mask = positive_mask.to(device=s.device, dtype=torch.bool)
    target_class = target_class.to(device=s.device, dtype=torch.long)
    target = torch.where(positive_mask, target_class, torch.zeros_like(target_class))
    if s.shape[0] == 0:
        return s.sum(-1)

    log_p = F.log_softmax(s, dim=-1)
    log_r = F.log_softmax(t, dim=-1)
    full_kl = kl_div_log_probs(log_r, log_p)

    # Binary (target vs rest) distributions in log space.
    s_nt, t_nt = _non_target(s, target), _non_target(t, target)
    s_lse, t_lse = torch.logsumexp(s, -1), torch.logsumexp(t, -1)
    log_p_c = log_p.gather(-1, target[:, None]).squeeze(-1)
    log_r_c = log_r.gather(-1, target[:, None]).squeeze(-1)
    log_p_rest = torch.logsumexp(s_nt, -1) - s_lse  # log(1 - p_c)
    log_r_rest = torch.logsumexp(t_nt, -1) - t_lse  # log(1 - r_c)
    tckd = kl_div_log_probs(torch.stack([log_r_c, log_r_rest], -1), torch.stack([log_p_c, log_p_rest], -1))
    nckd = kl_div_log_probs(F.log_softmax(t_nt, dim=-1), F.log_softmax(s_nt, dim=-1))
    return torch.where(positive_mask, alpha * tckd + beta * nckd, full_kl)


#: Forms of the class KD of a ``_TPRD`` variant (option ``class_kd`` of every prediction-level method).
CLASS_KD_FORMS = ("decoupled", "sigmoid", "decoupled+bce")


def sigmoid_decoupled_kd(student_logits: Tensor, teacher_logits: Tensor, positive_mask: Tensor, target_class: Tensor,
                         alpha: float = 1.0, beta: float = 1.0) -> Tensor:
    """A sigmoid form of TPRD-CKD (ours, not the reference's): per-class binary KL between the
    refined teacher's and the student's sigmoid scores, the family DETR classifiers are trained in.

    With ``KL_k = r_k log(r_k/p_k) + (1−r_k) log((1−r_k)/(1−p_k))``, ``p = σ(student)``,
    ``r = σ(teacher)``: a positive pair with target class ``c`` gives ``α·KL_c + β·Σ_{k≠c} KL_k``,
    a negative pair ``Σ_k KL_k``. Unlike the softmax form, every class keeps its own
    foreground/background probability, so "no object here" is taught too. With ``α = β = 1`` the
    gradient equals that of the soft-BCE prediction KD (they differ by the teacher's entropy).
    Same arguments and result shape as :func:`decoupled_kd`.
    """
    s, t = _pair_logits(student_logits, teacher_logits)
    # binary KL in log space: log σ(z) = −softplus(−z), log(1−σ(z)) = −softplus(z)
    r = torch.sigmoid(t)
    kl = r * (F.softplus(-s) - F.softplus(-t)) + (1.0 - r) * (F.softplus(s) - F.softplus(t))
    positive_mask = positive_mask.to(device=s.device, dtype=torch.bool)
    target = torch.where(positive_mask, target_class.to(device=s.device, dtype=torch.long),
                         torch.zeros_like(target_class, device=s.device, dtype=torch.long))
    total = kl.sum(-1)
    if s.shape[0] == 0:
        return total
    kl_c = kl.gather(-1, target[:, None]).squeeze(-1)
    return torch.where(positive_mask, alpha * kl_c + beta * (total - kl_c), total)


def tprd_class_kd(student_logits: Tensor, teacher_logits: Tensor, positive_mask: Tensor, target_class: Tensor,
                  alpha: float = 1.0, beta: float = 1.0, form: str = "decoupled") -> Tensor:
    """The class KD of a ``_TPRD`` variant per pair, in one of :data:`CLASS_KD_FORMS`:
    ``"decoupled"`` TPRD-CKD as the reference (:func:`decoupled_kd`, the default), ``"sigmoid"``
    (:func:`sigmoid_decoupled_kd`), or ``"decoupled+bce"``: TPRD-CKD plus the baselines' soft-BCE
    class KD against the same (refined) teacher scores, i.e. TPRD-CKD added to the method's own
    class KD instead of replacing it."""
    if form == "decoupled":
        return decoupled_kd(student_logits, teacher_logits, positive_mask, target_class, alpha, beta)
    if form == "sigmoid":
        return sigmoid_decoupled_kd(student_logits, teacher_logits, positive_mask, target_class, alpha, beta)
    if form == "decoupled+bce":
        s = _at_least_float32(student_logits)
        bce = F.binary_cross_entropy_with_logits(s, teacher_logits.detach().to(s.dtype).sigmoid(),
                                                 reduction="none").sum(-1)
        return decoupled_kd(student_logits, teacher_logits, positive_mask, target_class, alpha, beta) + bce
    raise ValueError(f"class_kd must be one of {CLASS_KD_FORMS}, got {form!r}")
