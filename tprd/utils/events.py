"""The event storage: the one channel between the trainer and the model it trains (as in
detectron2).

The trainer opens an :class:`EventStorage` for the whole run and sets :attr:`EventStorage.iter`
before every step; inside ``with EventStorage(...)`` any code reaches it through
:func:`get_event_storage` (or :func:`current_event_storage`, ``None`` outside). Through it

* the trainer puts scalars (losses, lr, timings, evaluation metrics), each tagged with the
  iteration; the writers of :mod:`tprd.engine.events` read them;
* a model reads the iteration it is trained at (the distiller hands it to its methods: MGD's
  random masks depend on it);
* a model puts per-iteration statistics that are not losses (the distiller's TPRD refinement
  shares) with :meth:`EventStorage.put_stats`; the trainer takes them with
  :meth:`EventStorage.pop_stats`, averages them over the processes and puts them as scalars.

This module imports nothing from ``tprd``: every layer may use it.
"""
from __future__ import annotations

from collections import defaultdict, deque
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch

__all__ = ["EventStorage", "get_event_storage", "current_event_storage", "HistoryBuffer"]

_CURRENT_STORAGE: List["EventStorage"] = []


def get_event_storage() -> "EventStorage":
    """The innermost active storage (inside ``with EventStorage(...)``)."""
    if not _CURRENT_STORAGE:
        raise RuntimeError("get_event_storage() called outside of `with EventStorage(...)`.")
    return _CURRENT_STORAGE[-1]


def current_event_storage() -> Optional["EventStorage"]:
    """The innermost active storage, or ``None`` outside any ``with EventStorage(...)`` (a model
    run outside a trainer: a test, a benchmark)."""
    return _CURRENT_STORAGE[-1] if _CURRENT_STORAGE else None


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
        self._stats: Dict[str, torch.Tensor] = {}

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

    def put_stats(self, stats: Mapping[str, torch.Tensor]) -> None:
        """Hand over this iteration's statistics that are not losses, as detached scalar tensors
        (no device sync here). The trainer collects them with :meth:`pop_stats` after the step."""
        self._stats.update({k: v.detach() for k, v in stats.items()})

    def pop_stats(self) -> Dict[str, torch.Tensor]:
        """The statistics put since the last call (and forget them)."""
        stats, self._stats = self._stats, {}
        return stats

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
