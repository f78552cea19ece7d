"""Evaluators (COCO, Pascal VOC) and the inference loop (detectron2's ``DatasetEvaluator`` API).

>>> results = inference_on_dataset(model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator))
>>> results["bbox"]["AP"]
"""
from __future__ import annotations

import datetime
import logging
import time
from collections import OrderedDict
from contextlib import ExitStack, contextmanager
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import torch

from tprd.progress import progress_bar

from .coco import COCOEvaluator, DatasetEvaluator, gather_to_main, is_main_process
from .voc import PascalVOCDetectionEvaluator, voc_ap, voc_eval

__all__ = [
    "DatasetEvaluator",
    "DatasetEvaluators",
    "COCOEvaluator",
    "PascalVOCDetectionEvaluator",
    "inference_on_dataset",
    "inference_context",
    "voc_ap",
    "voc_eval",
    "gather_to_main",
    "is_main_process",
]

logger = logging.getLogger(__name__)


class DatasetEvaluators(DatasetEvaluator):
    """Run several evaluators side by side; ``evaluate()`` merges their result dicts.

    Two evaluators reporting the same top-level key (e.g. both ``"bbox"``) is an error.
    """

    def __init__(self, evaluators: Sequence[DatasetEvaluator]):
        super().__init__()
        self._evaluators = list(evaluators)

    def reset(self) -> None:
        for e in self._evaluators:
            e.reset()

    def process(self, inputs: Sequence[Dict[str, Any]], outputs: Sequence[Any]) -> None:
        for e in self._evaluators:
            e.process(inputs, outputs)

    def evaluate(self) -> Dict[str, Any]:
        results: Dict[str, Any] = OrderedDict()
        for e in self._evaluators:
            res = e.evaluate()
            if not res or not is_main_process():
                continue
            for k, v in res.items():
                if k in results:
                    raise KeyError(f"two evaluators both report {k!r}; give them different tasks")
                results[k] = v
        return results


@contextmanager
def inference_context(model: torch.nn.Module):
    """Put ``model`` in eval mode for the block and restore its previous mode afterwards."""
    training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(training)


def _fmt(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(round(seconds))))


def _num_images(data_loader: Any) -> Optional[int]:
    """Images this process will see: the length of the loader's (batch) sampler, if it has one."""
    sampler = getattr(getattr(data_loader, "batch_sampler", None), "sampler", None)
    try:
        return len(sampler)  # type: ignore[arg-type]
    except TypeError:
        return None


def inference_on_dataset(
    model: torch.nn.Module,
    data_loader: Iterable[List[Dict[str, Any]]],
    evaluator: Optional[Union[DatasetEvaluator, Sequence[DatasetEvaluator]]],
    log_period_s: float = 5.0,
) -> Dict[str, Any]:
    """Run ``model`` over ``data_loader`` (eval mode, no grad) feeding ``evaluator``; return its results.

    Progress (images done / total, seconds per batch, ETA) is logged about every ``log_period_s``
    seconds once the first batches (warm-up, excluded from timing) are done; on the main process's
    terminal a live bar shows images done, images/s and the ETA (:mod:`tprd.progress`). ``evaluator`` may be
    ``None`` (only runs the model) or a list (combined with :class:`DatasetEvaluators`). Every
    process returns the evaluator's result (``{}`` on processes that do not compute metrics).
    """
    if evaluator is None:
        evaluator = DatasetEvaluators([])
    elif not isinstance(evaluator, DatasetEvaluator) and isinstance(evaluator, (list, tuple)):
        evaluator = DatasetEvaluators(evaluator)
    try:
        total = len(data_loader)  # type: ignore[arg-type]
    except TypeError:
        total = None
    logger.info("Start inference on %s batches", total if total is not None else "an unknown number of")
    evaluator.reset()

    def sync() -> None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    warmup = 5 if total is None else min(5, total - 1)
    n_images = 0
    start = time.perf_counter()
    timed_start = start
    compute_time = 0.0
    last_log = start
    with ExitStack() as stack:
        if isinstance(model, torch.nn.Module):
            stack.enter_context(inference_context(model))
        stack.enter_context(torch.no_grad())
        bar = stack.enter_context(progress_bar(_num_images(data_loader), "eval", unit="img", leave=False))
        idx = -1
        for idx, inputs in enumerate(data_loader):
            if idx == warmup:
                timed_start = time.perf_counter()
                compute_time = 0.0
            t0 = time.perf_counter()
            outputs = model(inputs)
            sync()
            compute_time += time.perf_counter() - t0
            evaluator.process(inputs, outputs)
            n_images += len(inputs)
            bar.update(len(inputs))
            now = time.perf_counter()
            done = idx + 1
            if done > warmup and now - last_log >= log_period_s:
                per_batch = (now - timed_start) / max(done - warmup, 1)
                eta = f", ETA {_fmt(per_batch * (total - done))}" if total is not None else ""
                logger.info(
                    "Inference done %d/%s batches (%d images). %.4f s/batch total, %.4f s/batch model%s",
                    done, total if total is not None else "?", n_images, per_batch,
                    compute_time / max(done - warmup, 1), eta,
                )
                last_log = now
    elapsed = time.perf_counter() - start
    timed = max(idx + 1 - warmup, 0)
    logger.info(
        "Total inference time: %s for %d images (%s per batch on the %d timed batches)",
        _fmt(elapsed), n_images,
        f"{(time.perf_counter() - timed_start) / timed:.4f} s" if timed else "n/a", timed,
    )
    results = evaluator.evaluate()
    return results if results is not None else {}
