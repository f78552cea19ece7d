"""The writers that report what training put into the :class:`EventStorage`.

The trainer puts scalars (losses, lr, timings, evaluation metrics) into an :class:`EventStorage`
tagged with the current iteration (the storage itself lives in the low-level
:mod:`tprd.utils.events`, so model code can use it too); writers read from it:

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
from collections import defaultdict
from typing import Any, Dict, Optional

import numpy as np
import torch

from tprd.utils.events import EventStorage, HistoryBuffer, get_event_storage

__all__ = [
    "EventStorage",
    "get_event_storage",
    "HistoryBuffer",
    "EventWriter",
    "CommonMetricPrinter",
    "JSONWriter",
    "TensorboardXWriter",
]

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
    """Append scalars to a JSON-lines file: ``{"iteration": i, "name": value, ...}``, one line per
    iteration, as detectron2 writes it.

    Each scalar is written once per iteration it was put at (its latest value, or windowed median
    if it has a smoothing hint). Scalars put at the iteration of the line written last (the final
    evaluation, put after that iteration's training scalars were written) are merged into that
    line: the line is rewritten in place, so scripts keyed by iteration find one record each.
    (A resumed run appends to the file and may repeat the iterations after its checkpoint.)
    """

    def __init__(self, json_file: str, window_size: int = 20):
        self._path = json_file
        self._file = open(json_file, "ab")  # binary: tell() / truncate() are byte offsets
        self._window = window_size
        self._last_written: Dict[str, int] = {}
        #: the record of the line written last and the file offset where that line starts
        self._last_record: Optional[Dict[str, Any]] = None
        self._last_offset = 0

    def write(self) -> None:
        storage = get_event_storage()
        grouped = _new_entries(storage, self._window, self._last_written)
        for it in sorted(grouped):
            last = self._last_record
            if last is not None and last["iteration"] == it:
                record = dict(last, **grouped[it])
                self._file.truncate(self._last_offset)
            else:
                record = {"iteration": it, **grouped[it]}
                self._last_offset = self._file.tell()
            self._file.write((json.dumps(record, sort_keys=True) + "\n").encode("utf-8"))
            self._last_record = record
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
