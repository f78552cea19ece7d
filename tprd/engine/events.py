"""Scalar bookkeeping for training (``EventStorage``) and the writers that report it.

The trainer puts scalars (losses, lr, timings, evaluation metrics) into an :class:`EventStorage`
tagged with the current iteration; writers read from it:

* :class:`CommonMetricPrinter` — one console line: ETA, iteration, losses, time, data_time, lr,
  max memory;
* :class:`JSONWriter` — ``metrics.json``, one JSON object per line with ``"iteration"``;
* :class:`TensorboardXWriter` — TensorBoard event files (``torch.utils.tensorboard``).
"""
from __future__ import annotations

import datetime
import json
import logging
import os
from collections import defaultdict, deque
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

__all__ = [
    "EventStorage",
    "get_event_storage",
    "HistoryBuffer",
    "EventWriter",
    "CommonMetricPrinter",
    "JSONWriter",
    "TensorboardXWriter",
]

_CURRENT_STORAGE: List["EventStorage"] = []


def get_event_storage() -> "EventStorage":
    """The innermost active storage (inside ``with EventStorage(...)``)."""
    if not _CURRENT_STORAGE:
        raise RuntimeError("get_event_storage() called outside of `with EventStorage(...)`.")
    return _CURRENT_STORAGE[-1]


class HistoryBuffer:
    """The last ``max_length`` values of one scalar, with the iteration each was put at."""

    def __init__(self, max_length: int = 1_000_000):
        self._data: deque = deque(maxlen=max_length)
        self._global_sum = 0.0
        self._count = 0

    def update(self, value: float, iteration: int) -> None:
        self._data.append((float(value), int(iteration)))
        self._global_sum += float(value)
        self._count += 1

    def latest(self) -> float:
        return self._data[-1][0]

    def median(self, window: int) -> float:
        return float(np.median([v for v, _ in list(self._data)[-window:]]))

    def avg(self, window: int) -> float:
        return float(np.mean([v for v, _ in list(self._data)[-window:]]))

    def global_avg(self) -> float:
        return self._global_sum / max(self._count, 1)

    def values(self) -> List[Tuple[float, int]]:
        return list(self._data)


class EventStorage:
    """Scalars put during training, keyed by name, each tagged with the iteration."""

    def __init__(self, start_iter: int = 0):
        self.iter = int(start_iter)
        self._history: Dict[str, HistoryBuffer] = defaultdict(HistoryBuffer)
        self._latest: Dict[str, Tuple[float, int]] = {}
        self._smoothing_hints: Dict[str, bool] = {}
        #: names of the scalars that are loss terms (the console line shows these)
        self.loss_names: set = set()

    def put_scalar(self, name: str, value: Any, smoothing_hint: bool = True) -> None:
        """Record ``value`` for ``name`` at the current iteration.

        ``smoothing_hint`` tells writers whether a windowed median is meaningful (losses) or the
        raw latest value should be shown (lr, evaluation metrics).
        """
        if isinstance(value, torch.Tensor):
            value = value.detach().item()
        value = float(value)
        self._history[name].update(value, self.iter)
        self._latest[name] = (value, self.iter)
        previous = self._smoothing_hints.get(name)
        if previous is not None and previous != smoothing_hint:
            raise ValueError(f"Scalar {name!r} was put with a different smoothing_hint before.")
        self._smoothing_hints[name] = smoothing_hint

    def put_scalars(self, *, smoothing_hint: bool = True, **kwargs: Any) -> None:
        for k, v in kwargs.items():
            self.put_scalar(k, v, smoothing_hint=smoothing_hint)

    def history(self, name: str) -> HistoryBuffer:
        if name not in self._history:
            raise KeyError(f"No scalar named {name!r} in the EventStorage.")
        return self._history[name]

    def histories(self) -> Dict[str, HistoryBuffer]:
        return dict(self._history)

    def latest(self) -> Dict[str, Tuple[float, int]]:
        """``name -> (latest value, iteration it was put at)``."""
        return dict(self._latest)

    def latest_with_smoothing_hint(self, window: int = 20) -> Dict[str, Tuple[float, int]]:
        """Like :meth:`latest`, with smoothed scalars replaced by their windowed median."""
        out = {}
        for name, (value, it) in self._latest.items():
            if self._smoothing_hints[name]:
                value = self._history[name].median(window)
            out[name] = (value, it)
        return out

    def step(self) -> None:
        self.iter += 1

    def __enter__(self) -> "EventStorage":
        _CURRENT_STORAGE.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        assert _CURRENT_STORAGE[-1] is self
        _CURRENT_STORAGE.pop()


# --------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------
class EventWriter:
    def write(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


def _new_entries(storage: EventStorage, window: int, last_written: Dict[str, int]) -> Dict[int, Dict[str, float]]:
    """Scalars not written yet, grouped by the iteration they were put at."""
    grouped: Dict[int, Dict[str, float]] = defaultdict(dict)
    for name, (value, it) in storage.latest_with_smoothing_hint(window).items():
        if it <= last_written.get(name, -1):
            continue
        grouped[it][name] = value
        last_written[name] = it
    return grouped


class JSONWriter(EventWriter):
    """Append scalars to a JSON-lines file: ``{"iteration": i, "name": value, ...}`` per line.

    Each scalar is written once per iteration it was put at (its latest value, or windowed
    median if it has a smoothing hint); evaluation results put after the training scalars of an
    iteration come as a second line with the same iteration.
    """

    def __init__(self, json_file: str, window_size: int = 20):
        self._path = json_file
        self._file = open(json_file, "a", encoding="utf-8")
        self._window = window_size
        self._last_written: Dict[str, int] = {}

    def write(self) -> None:
        storage = get_event_storage()
        grouped = _new_entries(storage, self._window, self._last_written)
        for it in sorted(grouped):
            record = {"iteration": it}
            record.update(grouped[it])
            self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()
        try:
            os.fsync(self._file.fileno())
        except OSError:
            pass

    def close(self) -> None:
        self._file.close()


class TensorboardXWriter(EventWriter):
    """Write scalars to TensorBoard event files in ``log_dir``."""

    def __init__(self, log_dir: str, window_size: int = 20, **kwargs: Any):
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir, **kwargs)
        self._window = window_size
        self._last_written: Dict[str, int] = {}

    def write(self) -> None:
        storage = get_event_storage()
        grouped = _new_entries(storage, self._window, self._last_written)
        for it in sorted(grouped):
            for name, value in grouped[it].items():
                self._writer.add_scalar(name, value, it)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class CommonMetricPrinter(EventWriter):
    """Log one line per call: ETA, iteration, losses, time/iter, data_time, lr, max memory."""

    def __init__(self, max_iter: Optional[int] = None, window_size: int = 20):
        self.logger = logging.getLogger("tprd.engine")
        self._max_iter = max_iter
        self._window = window_size
        self._last_printed: Optional[int] = None

    def _eta(self, storage: EventStorage) -> Optional[str]:
        """Remaining iterations x median iteration time (needs the ``time`` scalar)."""
        if self._max_iter is None or "time" not in storage.histories():
            return None
        remaining = self._max_iter - storage.iter - 1
        seconds = storage.history("time").median(1000) * remaining
        storage.put_scalar("eta_seconds", seconds, smoothing_hint=False)
        return str(datetime.timedelta(seconds=int(seconds)))

    def write(self) -> None:
        storage = get_event_storage()
        it = storage.iter
        if it == self._last_printed:
            return  # e.g. the final write after training: this iteration was printed already
        hist = storage.histories()
        loss_names = storage.loss_names or {k for k in hist if "loss" in k}
        if not any(hist[k].values()[-1][1] == it for k in hist if k in loss_names or k == "time"):
            # no training step was recorded for this iteration: it failed, or a finished run was
            # resumed and only evaluated (the evaluation logs its own lines)
            return
        self._last_printed = it

        def windowed(name: str) -> Optional[float]:
            h = hist.get(name)
            if h is None:
                return None
            values = [v for v, i in h.values() if i > it - self._window]
            return float(np.median(values)) if values else None

        data_time = windowed("data_time")
        iter_time = windowed("time")
        lr = f"{hist['lr'].latest():.5g}" if "lr" in hist else None
        losses = "  ".join(
            f"{k}: {h.median(self._window):.4g}"
            for k, h in sorted(hist.items())
            if k in loss_names and h.values()[-1][1] > it - self._window
        )
        eta = self._eta(storage)
        mem = None
        if torch.cuda.is_available():
            mem = torch.cuda.max_memory_allocated() / 1024.0 / 1024.0
        total = f"/{self._max_iter}" if self._max_iter is not None else ""
        parts = [f"eta: {eta}" if eta else "", f"iter: {it}{total}", losses]
        if iter_time is not None:
            parts.append(f"time: {iter_time:.4f}")
        if data_time is not None:
            parts.append(f"data_time: {data_time:.4f}")
        if lr is not None:
            parts.append(f"lr: {lr}")
        if mem is not None:
            parts.append(f"max_mem: {mem:.0f}M")
        self.logger.info("  ".join(p for p in parts if p))
