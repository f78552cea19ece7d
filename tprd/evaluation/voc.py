"""Pascal VOC box AP (the devkit's ``voc_eval`` protocol, as detectron2's ``PascalVOCDetectionEvaluator``).

Per class and IoU threshold ``t``: detections of all test images are ranked by score; each one is
matched to the ground-truth box of its image and class with the **highest** IoU; it is a true
positive if that IoU is ``> t`` (strictly), the box is not *difficult* and not already taken by a
higher-ranked detection; a match to a difficult box counts as neither TP nor FP; everything else
is a false positive. Recall is over the non-difficult boxes of all test images (including images
that were never evaluated). AP is the 11-point interpolated AP of the VOC2007 devkit
(``max precision at recall >= r`` for ``r`` in ``numpy.arange(0, 1.1, 0.1)``, those exact floats)
when the dataset's ``year`` is 2007, else the area under the monotone precision envelope.

Reported (percent): ``AP50`` and ``AP75`` = mean over classes at ``t = 0.5 / 0.75``; ``AP`` = mean
of the per-threshold means over ``t = 0.50, 0.55, ..., 0.95``; plus ``AP50-<class>``. Classes with
no non-difficult ground truth are left out of the means (their AP is ``nan``).

Coordinate convention. detectron2 loads VOC boxes as ``(xmin - 1, ymin - 1, xmax, ymax)``
(continuous, 0-based), its models predict in that frame, and its evaluator writes detections back
as ``(x0 + 1, y0 + 1, x1, y1)`` before ``voc_eval`` computes IoU with the devkit's ``+1`` pixel
widths against the raw xml boxes. The ``+1`` and the shift cancel exactly: the devkit IoU equals
the plain continuous IoU of the prediction and ``(xmin - 1, ymin - 1, xmax, ymax)``. So here the
ground truth is loaded in that frame (:func:`tprd.data.load_voc_instances`) and IoU is the plain
one — same numbers, no off-by-one bookkeeping. Differences from detectron2, on purpose: scores and
boxes are not rounded to 3 / 1 decimals (detectron2 formats them as text), and ties in score keep
the order in which images were processed (a stable sort; the devkit's quicksort order is arbitrary).
"""
from __future__ import annotations

import logging
import warnings
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .coco import DatasetEvaluator, _prediction_arrays, _resolve_dataset_name

__all__ = ["PascalVOCDetectionEvaluator", "voc_ap", "voc_eval"]

logger = logging.getLogger(__name__)

#: The devkit's recall points for the 11-point AP, as numpy computes them (0.30000000000000004...).
_RECALL_POINTS_07 = np.arange(0.0, 1.1, 0.1)


def voc_ap(rec: np.ndarray, prec: np.ndarray, use_07_metric: bool = False) -> np.ndarray:
    """AP from cumulative recall / precision curves ``[..., D]`` (any leading dims); returns ``[...]``."""
    rec = np.asarray(rec, dtype=np.float64)
    prec = np.asarray(prec, dtype=np.float64)
    if use_07_metric:
        reached = rec[..., None, :] >= _RECALL_POINTS_07[:, None]  # [..., 11, D]
        best = np.where(reached, prec[..., None, :], -np.inf).max(axis=-1, initial=-np.inf)
        return np.where(np.isfinite(best), best, 0.0).sum(axis=-1) / 11.0
    lead = rec.shape[:-1]
    mrec = np.concatenate([np.zeros(lead + (1,)), rec, np.ones(lead + (1,))], axis=-1)
    mpre = np.concatenate([np.zeros(lead + (1,)), prec, np.zeros(lead + (1,))], axis=-1)
    envelope = np.flip(np.maximum.accumulate(np.flip(mpre, -1), axis=-1), -1)
    return ((mrec[..., 1:] - mrec[..., :-1]) * envelope[..., 1:]).sum(axis=-1)


def _pairwise_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise IoU of ``a[i]`` and ``b[i]`` (continuous xyxy)."""
    iw = np.maximum(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0.0)
    ih = np.maximum(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0.0)
    inter = iw * ih
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    with np.errstate(divide="ignore", invalid="ignore"):
        return inter / (area_a + area_b - inter)


def voc_eval(
    det_image: np.ndarray,
    det_score: np.ndarray,
    det_box: np.ndarray,
    gt_image: np.ndarray,
    gt_box: np.ndarray,
    gt_difficult: np.ndarray,
    num_images: int,
    iou_thresholds: Sequence[float] = (0.5,),
    use_07_metric: bool = True,
) -> np.ndarray:
    """VOC AP of **one class** at several IoU thresholds, vectorised; returns ``[T]`` (nan if no GT).

    ``det_image`` / ``gt_image`` are image indices in ``[0, num_images)``; boxes are continuous
    xyxy in the same frame. Detections are ranked by score (stable for ties).
    """
    det_image = np.asarray(det_image, dtype=np.int64).reshape(-1)
    det_score = np.asarray(det_score, dtype=np.float64).reshape(-1)
    det_box = np.asarray(det_box, dtype=np.float64).reshape(-1, 4)
    gt_image = np.asarray(gt_image, dtype=np.int64).reshape(-1)
    gt_box = np.asarray(gt_box, dtype=np.float64).reshape(-1, 4)
    gt_difficult = np.asarray(gt_difficult, dtype=bool).reshape(-1)
    thr = np.asarray(iou_thresholds, dtype=np.float64).reshape(-1)
    T = len(thr)

    npos = int((~gt_difficult).sum())
    if npos == 0:
        return np.full(T, np.nan)
    D = len(det_score)
    if D == 0:
        return np.zeros(T)

    order = np.argsort(-det_score, kind="stable")
    det_image, det_box = det_image[order], det_box[order]

    # Ground truth grouped by image: those of image m are gt_sorted[start[m] : start[m] + count[m]].
    g_order = np.argsort(gt_image, kind="stable")
    count = np.bincount(gt_image, minlength=num_images)
    start = np.concatenate([[0], np.cumsum(count)[:-1]])

    # Every (detection, gt of the same image) pair.
    n_pairs = count[det_image]
    pair_det = np.repeat(np.arange(D), n_pairs)
    offsets = np.arange(int(n_pairs.sum())) - np.repeat(np.cumsum(n_pairs) - n_pairs, n_pairs)
    pair_gt = g_order[np.repeat(start[det_image], n_pairs) + offsets]
    iou = _pairwise_iou(det_box[pair_det], gt_box[pair_gt])

    # Best gt per detection: highest IoU, the first such gt (devkit argmax) on ties.
    best_iou = np.full(D, -np.inf)
    best_gt = np.full(D, -1, dtype=np.int64)
    if len(iou):
        rank_key = np.where(np.isnan(iou), np.inf, -iou)  # nan sorts last, like never matching
        srt = np.lexsort((pair_gt, rank_key, pair_det))
        firsts = srt[np.r_[True, pair_det[srt][1:] != pair_det[srt][:-1]]]
        best_iou[pair_det[firsts]] = iou[firsts]
        best_gt[pair_det[firsts]] = pair_gt[firsts]

    valid = best_iou[None, :] > thr[:, None]  # [T, D]
    hits_difficult = valid & gt_difficult[np.maximum(best_gt, 0)][None, :]
    candidate = valid & ~hits_difficult
    # A candidate is a TP iff it is the highest-ranked candidate for its gt box at that threshold.
    t_idx, d_idx = np.nonzero(candidate)  # row-major: by threshold, then by rank
    key = t_idx * (len(gt_box) + 1) + best_gt[d_idx]
    _, first = np.unique(key, return_index=True)
    tp = np.zeros((T, D), dtype=np.float64)
    tp[t_idx[first], d_idx[first]] = 1.0
    fp = (~hits_difficult).astype(np.float64) - tp

    tp_cum, fp_cum = np.cumsum(tp, axis=1), np.cumsum(fp, axis=1)
    rec = tp_cum / float(npos)
    prec = tp_cum / np.maximum(tp_cum + fp_cum, np.finfo(np.float64).eps)
    return voc_ap(rec, prec, use_07_metric)


class PascalVOCDetectionEvaluator(DatasetEvaluator):
    """VOC AP / AP50 / AP75 of a registered VOC-layout dataset (see the module docstring).

    Args:
        dataset_name: e.g. ``"voc_2007_test"`` (11-point AP since its ``year`` is 2007).
        distributed: gather predictions to rank 0 (which alone returns metrics).
    """

    IOU_THRESHOLDS: Tuple[float, ...] = tuple(t / 100.0 for t in range(50, 100, 5))

    def __init__(self, dataset_name: Any, distributed: bool = True):
        from tprd.data.catalog import prepare_dataset

        self.dataset_name = _resolve_dataset_name(dataset_name)
        meta = prepare_dataset(self.dataset_name)
        if meta.get("evaluator_type") != "voc":
            from tprd.errors import UserError

            raise UserError(f"dataset {self.dataset_name!r} is not a VOC-layout dataset (evaluator_type={meta.get('evaluator_type')!r}); COCO-format sets use COCOEvaluator")
        self._class_names = list(meta.thing_classes)
        self._is_2007 = int(meta.get("year", 0)) == 2007
        self._distributed = bool(distributed)
        self._gt: Optional[Dict[str, Any]] = None
        self._predictions: List[Dict[str, Any]] = []

    def reset(self) -> None:
        self._predictions = []

    def process(self, inputs: Sequence[Dict[str, Any]], outputs: Sequence[Any]) -> None:
        for inp, out in zip(inputs, outputs):
            p = _prediction_arrays(out)
            p["image_id"] = int(inp["image_id"])
            self._predictions.append(p)

    def _ground_truth(self) -> Dict[str, Any]:
        if self._gt is None:
            from tprd.data.catalog import MetadataCatalog
            from tprd.data.checks import strict_loading
            from tprd.data.datasets import load_voc_instances

            # the records the loader keeps (same skipped objects, same warning); images not needed
            meta = MetadataCatalog.get(self.dataset_name)
            with strict_loading(False):
                records = load_voc_instances(meta.dirname, meta.split, meta.thing_classes,
                                             dataset_name=f"{self.dataset_name} (evaluation ground truth)",
                                             check_files=False)
            if not any(len(r["classes"]) for r in records):
                logger.warning("%s has no annotated object: its AP is undefined (nan); evaluate on a split with boxes",
                               self.dataset_name)
            ids = [int(r["image_id"]) for r in records]
            counts = [len(r["classes"]) for r in records]
            self._gt = {
                "index": {img: i for i, img in enumerate(ids)},
                "image": np.repeat(np.arange(len(records)), counts),
                "boxes": np.concatenate([np.asarray(r["boxes"], np.float64).reshape(-1, 4) for r in records] or [np.zeros((0, 4))]),
                "classes": np.concatenate([np.asarray(r["classes"], np.int64).reshape(-1) for r in records] or [np.zeros(0, np.int64)]),
                "difficult": np.concatenate(
                    [np.asarray(r.get("difficult", np.zeros(len(r["classes"]))), bool).reshape(-1) for r in records]
                    or [np.zeros(0, bool)]
                ),
            }
        return self._gt

    def evaluate(self) -> Dict[str, Any]:
        predictions = self._gathered_predictions(logger)
        if predictions is None:
            return {}
        gt = self._ground_truth()
        index = gt["index"]
        unknown = sorted({p["image_id"] for p in predictions} - set(index))
        if unknown:
            raise ValueError(f"predictions for image ids {unknown[:10]} that are not in {self.dataset_name!r}")
        counts = [len(p["scores"]) for p in predictions]
        det_image = np.repeat(np.asarray([index[p["image_id"]] for p in predictions], dtype=np.int64), counts)
        det_box = np.concatenate([p["boxes"] for p in predictions])
        det_score = np.concatenate([p["scores"] for p in predictions])
        det_label = np.concatenate([p["labels"] for p in predictions])

        n_img = len(index)
        C = len(self._class_names)
        aps = np.full((len(self.IOU_THRESHOLDS), C), np.nan)
        for c in range(C):  # one vectorised voc_eval per class (as the devkit)
            d, g = det_label == c, gt["classes"] == c
            aps[:, c] = voc_eval(
                det_image[d], det_score[d], det_box[d], gt["image"][g], gt["boxes"][g], gt["difficult"][g],
                n_img, self.IOU_THRESHOLDS, use_07_metric=self._is_2007,
            )
        aps *= 100.0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-nan rows: no class has ground truth
            per_thr = np.nanmean(aps, axis=1)
        thr = list(self.IOU_THRESHOLDS)
        result = {
            "AP": float(np.mean(per_thr)),
            "AP50": float(per_thr[thr.index(0.5)]),
            "AP75": float(per_thr[thr.index(0.75)]),
        }
        result.update({f"AP50-{n}": float(aps[thr.index(0.5), c]) for c, n in enumerate(self._class_names)})
        logger.info(
            "VOC evaluation of %s (%s AP): AP %.2f, AP50 %.2f, AP75 %.2f",
            self.dataset_name, "11-point" if self._is_2007 else "area", result["AP"], result["AP50"], result["AP75"],
        )
        return OrderedDict(bbox=result)
