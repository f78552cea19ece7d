"""COCO box AP (detectron2's ``COCOEvaluator`` semantics, boxes only).

Scored by ``faster-coco-eval`` (a maintained C++ reimplementation of ``COCOeval``, the evaluator
RT-DETR uses; ``pip install tprd[fast-eval]``) when it is installed, else by pycocotools; both give
the same numbers (tested to 1e-4), the first several times faster on COCO-size runs
(``benchmarks/coco_eval.md``). ``COCOEvaluator(engine=...)`` picks one explicitly.

Predictions (``{"boxes" xyxy in the original (height, width) frame, "scores", "labels"}`` per
image) become COCO results (``[x, y, w, h]``, dataset category ids), are gathered from all
processes, optionally written to ``<output_dir>/coco_instances_results.json`` and scored with
``COCOeval`` over **all** images of the ground-truth json (as detectron2 does: images that were not
evaluated count as misses). Metrics are percentages.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["DatasetEvaluator", "COCOEvaluator", "gather_to_main", "is_main_process", "COCO_ENGINES",
           "resolve_coco_engine", "faster_coco_eval_available"]

logger = logging.getLogger(__name__)

_COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")

#: ``engine`` values of :class:`COCOEvaluator`.
COCO_ENGINES = ("auto", "faster_coco_eval", "pycocotools")


def faster_coco_eval_available() -> bool:
    try:
        import faster_coco_eval  # noqa: F401
    except Exception:
        return False
    return True


def resolve_coco_engine(engine: str) -> str:
    """``"faster_coco_eval"`` or ``"pycocotools"`` for an ``engine`` of :data:`COCO_ENGINES`."""
    if engine not in COCO_ENGINES:
        raise ValueError(f"COCOEvaluator engine must be one of {list(COCO_ENGINES)}, got {engine!r}")
    if engine == "auto":
        return "faster_coco_eval" if faster_coco_eval_available() else "pycocotools"
    if engine == "faster_coco_eval" and not faster_coco_eval_available():
        raise ImportError("COCOEvaluator(engine='faster_coco_eval') needs the faster-coco-eval package: "
                          "pip install faster-coco-eval (or tprd[fast-eval]); engine='auto' falls back to pycocotools")
    return engine


def _coco_classes(engine: str):
    """``(COCO, COCOeval)`` of the engine."""
    if engine == "faster_coco_eval":
        from faster_coco_eval import COCO, COCOeval_faster

        return COCO, COCOeval_faster
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    return COCO, COCOeval


# --------------------------------------------------------------------------------------------
# Small distributed helpers (shared with the VOC evaluator)
# --------------------------------------------------------------------------------------------
def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def gather_to_main(obj: Any) -> Optional[List[Any]]:
    """Everyone's ``obj`` on rank 0 (a list in rank order), ``None`` elsewhere; ``[obj]`` alone.

    Uses ``all_gather_object`` (works with NCCL, unlike ``gather_object``; with NCCL each
    process must have called ``torch.cuda.set_device``).
    """
    if not _dist_on():
        return [obj]
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out if dist.get_rank() == 0 else None


def _resolve_dataset_name(dataset_name: Any) -> str:
    """Accept a name, or a one-element sequence (``"${..test.dataset.names}"`` may be a list)."""
    if isinstance(dataset_name, str):
        return dataset_name
    names = [str(n) for n in dataset_name]
    if len(names) != 1:
        raise ValueError(f"an evaluator evaluates one dataset, got {names}")
    return names[0]


def _prediction_arrays(output: Any) -> Dict[str, np.ndarray]:
    """``boxes`` [K,4] xyxy, ``scores`` [K], ``labels`` [K] as CPU numpy arrays."""
    if isinstance(output, dict) and "instances" in output and "boxes" not in output:
        output = output["instances"]
    try:
        boxes, scores, labels = output["boxes"], output["scores"], output["labels"]
    except (KeyError, TypeError):
        raise TypeError(
            "a model output must be a dict with 'boxes' [K,4] (xyxy, original image frame), "
            f"'scores' [K] and 'labels' [K]; got {type(output).__name__}"
        ) from None

    def arr(x: Any, dtype: Any) -> np.ndarray:
        if isinstance(x, torch.Tensor):
            x = x.detach().to("cpu", torch.float64 if dtype is np.float64 else torch.int64)
            return x.numpy().astype(dtype, copy=False)
        return np.asarray(x, dtype=dtype)

    b = arr(boxes, np.float64).reshape(-1, 4)
    s = arr(scores, np.float64).reshape(-1)
    lab = arr(labels, np.int64).reshape(-1)
    if not len(b) == len(s) == len(lab):
        raise ValueError(f"boxes ({len(b)}), scores ({len(s)}) and labels ({len(lab)}) differ in length")
    return {"boxes": b, "scores": s, "labels": lab}


class DatasetEvaluator:
    """Base class: ``reset()``, then ``process(inputs, outputs)`` per batch, then ``evaluate()``."""

    def reset(self) -> None:
        pass

    def process(self, inputs: Sequence[Dict[str, Any]], outputs: Sequence[Any]) -> None:
        pass

    def evaluate(self) -> Optional[Dict[str, Any]]:
        return None

    def _gathered_predictions(self, log: logging.Logger, hint: str = "") -> Optional[List[Any]]:
        """The ``_predictions`` of every process on the main one (``distributed``; else this
        process's own), or ``None`` where there is nothing to score: on the other processes, and
        when no prediction came at all (warned on ``log``, with ``hint``)."""
        predictions = self._predictions
        if self._distributed:
            gathered = gather_to_main(predictions)
            if gathered is None:
                return None
            predictions = [p for part in gathered for p in part]
        if not predictions:
            log.warning("%s(%s) received no predictions%s", type(self).__name__, self.dataset_name, hint)
            return None
        return predictions


class COCOEvaluator(DatasetEvaluator):
    """COCO box AP of a registered COCO-format dataset.

    Args:
        dataset_name: a registered dataset with a ``json_file`` (COCO ground truth) and
            ``thing_contiguous_id_to_dataset_id`` (built-ins, ``register_coco_instances``).
        output_dir: where ``coco_instances_results.json`` is written (rank 0); ``None``: nowhere.
        distributed: gather predictions from all processes to rank 0 (which alone returns
            metrics; the others return ``{}``).
        max_dets_per_image: the last of COCOeval's ``maxDets`` (default 100, COCO's standard).
        engine: ``"auto"`` (faster-coco-eval when installed, else pycocotools), ``"faster_coco_eval"``
            or ``"pycocotools"``.

    ``evaluate()`` returns ``OrderedDict(bbox={"AP", "AP50", "AP75", "APs", "APm", "APl",
    "AP-<class name>"...})`` in percent; a class without ground truth gets ``nan``. When images
    were processed but nothing was detected, every metric is 0 (pycocotools cannot score an empty
    result list); when no image was processed at all, ``{}`` with a warning.
    """

    def __init__(
        self,
        dataset_name: Any,
        output_dir: Optional[str] = None,
        distributed: bool = True,
        max_dets_per_image: Optional[int] = None,
        engine: str = "auto",
    ):
        from tprd.data.catalog import prepare_dataset

        self.dataset_name = _resolve_dataset_name(dataset_name)
        self._metadata = prepare_dataset(self.dataset_name)
        if self._metadata.get("json_file") is None:
            from tprd.errors import UserError

            raise UserError(
                f"dataset {self.dataset_name!r} has no COCO json_file; register it with "
                "register_coco_instances (VOC-layout sets use PascalVOCDetectionEvaluator)"
            )
        self._output_dir = output_dir
        self._distributed = bool(distributed)
        self._max_dets = [1, 10, 100 if max_dets_per_image is None else int(max_dets_per_image)]
        self.engine = resolve_coco_engine(engine)
        self._coco_gt = None
        self._predictions: List[Dict[str, Any]] = []

    # ------------------------------------------------------------------ gt / id mapping
    @property
    def coco_gt(self):
        """The ground truth the training loader keeps (:func:`tprd.data.checks.check_coco_json`:
        annotations with an unknown image or an unusable box are left out, with the loader's warning)."""
        if self._coco_gt is None:
            from tprd.data.checks import check_coco_json, strict_loading

            data = check_coco_json(self._metadata.json_file, self._metadata.get("image_root", ""),
                                   name=self.dataset_name, check_files=False)
            with strict_loading(False):  # a strict test loader has stopped the run already
                data.skips.report(f"{self.dataset_name} (evaluation ground truth)", str(self._metadata.json_file))
            if not data.dataset["annotations"]:
                logger.warning(
                    "%s has no annotation in %s: its AP is undefined (nan); evaluate on a split with boxes",
                    self.dataset_name, self._metadata.json_file,
                )
            COCO, _ = _coco_classes(self.engine)  # the engine's COCO class: its COCOeval takes it
            coco = COCO()
            coco.dataset = data.dataset
            with contextlib.redirect_stdout(io.StringIO()):
                coco.createIndex()
            self._coco_gt = coco
        return self._coco_gt

    def _label_to_category(self) -> np.ndarray:
        mapping = self._metadata.get("thing_contiguous_id_to_dataset_id")
        if mapping is None:
            raise ValueError(f"dataset {self.dataset_name!r} has no thing_contiguous_id_to_dataset_id metadata")
        lut = np.full(max(mapping) + 1, -1, dtype=np.int64)
        lut[np.asarray(list(mapping.keys()), dtype=np.int64)] = np.asarray(list(mapping.values()), dtype=np.int64)
        return lut

    # ------------------------------------------------------------------ API
    def reset(self) -> None:
        self._predictions = []

    def process(self, inputs: Sequence[Dict[str, Any]], outputs: Sequence[Any]) -> None:
        """Keep each image's predictions as COCO-format arrays (xywh, category ids)."""
        lut = self._label_to_category()
        for inp, out in zip(inputs, outputs):
            p = _prediction_arrays(out)
            labels = p["labels"]
            if labels.size and (labels.min() < 0 or labels.max() >= len(lut) or (lut[labels] < 0).any()):
                raise ValueError(
                    f"image {inp.get('image_id')}: predicted labels {np.unique(labels).tolist()} are outside "
                    f"the {len(lut)} classes of {self.dataset_name!r}"
                )
            b = p["boxes"]
            xywh = np.concatenate([b[:, :2], b[:, 2:] - b[:, :2]], axis=1)
            self._predictions.append(
                {
                    "image_id": int(inp["image_id"]),
                    "bbox": xywh,
                    "score": p["scores"],
                    "category_id": lut[labels] if labels.size else labels,
                }
            )

    def _results_json(self, predictions: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        results = []
        for p in predictions:
            img = p["image_id"]
            for box, score, cat in zip(p["bbox"].tolist(), p["score"].tolist(), p["category_id"].tolist()):
                results.append({"image_id": img, "category_id": int(cat), "bbox": box, "score": float(score)})
        return results

    def evaluate(self) -> Dict[str, Any]:
        predictions = self._gathered_predictions(logger, "; was the loader empty?")
        if predictions is None:
            return {}
        self.coco_gt  # the ground truth's warnings (skipped annotations, none at all) come first
        results = self._results_json(predictions)
        if self._output_dir:
            os.makedirs(self._output_dir, exist_ok=True)
            path = Path(self._output_dir) / "coco_instances_results.json"
            with open(path, "w") as f:
                json.dump(results, f)
            logger.info("Saved %d detections to %s", len(results), path)
        return OrderedDict(bbox=self._score(results))

    # ------------------------------------------------------------------ scoring
    def _score(self, results: List[Dict[str, Any]]) -> Dict[str, float]:
        class_names = list(self._metadata.get("thing_classes") or [])
        if not results:
            logger.warning("COCOEvaluator(%s): the model made no detections; all APs are 0", self.dataset_name)
            metrics = {k: 0.0 for k in _COCO_METRICS}
            metrics.update({f"AP-{n}": 0.0 for n in class_names})
            return metrics

        _, COCOeval = _coco_classes(self.engine)
        coco_gt = self.coco_gt
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            coco_dt = coco_gt.loadRes(copy.deepcopy(results))
            if self.engine == "faster_coco_eval":
                ev = COCOeval(coco_gt, coco_dt, "bbox", print_function=print)
            else:
                ev = COCOeval(coco_gt, coco_dt, "bbox")
            ev.params.maxDets = list(self._max_dets)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        logger.info("COCO evaluation of %s (%s):\n%s", self.dataset_name, self.engine, buf.getvalue())
        stats = np.asarray(ev.stats[:6], dtype=np.float64)
        metrics = {k: float(v * 100) if v >= 0 else float("nan") for k, v in zip(_COCO_METRICS, stats)}

        # Per class: precision [T, R, K, A, M] at area "all" and the largest maxDets.
        precision = ev.eval["precision"][:, :, :, 0, -1]
        cat_ids = list(ev.params.catIds)
        to_contiguous = self._metadata.get("thing_dataset_id_to_contiguous_id") or {}
        per_class: Dict[str, float] = {}
        for k, cid in enumerate(cat_ids):
            p = precision[:, :, k]
            p = p[p > -1]
            label = to_contiguous.get(cid)
            name = class_names[label] if label is not None and label < len(class_names) else str(cid)
            per_class[f"AP-{name}"] = float(p.mean() * 100) if p.size else float("nan")
        metrics.update(per_class)
        return metrics
