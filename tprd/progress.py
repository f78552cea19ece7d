"""Live progress bars (tqdm) for the loops a user waits for: training, evaluation, data generation.

A bar is drawn only on the main process and only when its stream (standard error by default) is a
terminal: CI logs, ``2> file`` and worker processes get nothing, and log files never hold bar
characters. While a bar is open, the console lines of the ``tprd`` and ``fvcore`` loggers are
printed above it (``tqdm.write``) instead of through it; log files are untouched.

>>> with progress_bar(total=len(images), desc="generate", unit="img") as bar:
...     for image in images:
...         write(image)
...         bar.update(1)

This module imports nothing from the rest of ``tprd``, so any package may use it.
"""
from __future__ import annotations

import contextlib
import logging
import sys
from typing import IO, Any, Iterator, List, Optional, Tuple

__all__ = ["progress_bar", "bar_enabled", "NoBar", "SECONDS_PER_UNIT", "UNITS_PER_SECOND"]

#: bar layouts: rate as seconds per unit (training iterations) or units per second (images)
SECONDS_PER_UNIT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_inv_fmt}{postfix}]"
UNITS_PER_SECOND = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]"

_LOGGERS = ("tprd", "fvcore")


def _is_main_process() -> bool:
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return True
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def bar_enabled(file: Optional[IO] = None) -> bool:
    """True on the main process when ``file`` (default ``sys.stderr``) is a terminal."""
    stream = file if file is not None else sys.stderr
    try:
        is_tty = bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or not a stream
        is_tty = False
    return is_tty and _is_main_process()


class NoBar:
    """Stands in for a tqdm bar where none is drawn: every call does nothing."""

    n = 0

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass


class _BarLogHandler(logging.Handler):
    """Prints records above the open bars (``tqdm.write``), like the console handler it replaces."""

    def __init__(self, replaced: logging.StreamHandler):
        super().__init__(replaced.level)
        self.setFormatter(replaced.formatter)
        for f in replaced.filters:
            self.addFilter(f)
        self.stream = replaced.stream

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
            self.stream.flush()
        except Exception:  # pragma: no cover - like logging.StreamHandler
            self.handleError(record)


@contextlib.contextmanager
def _console_logs_above_bars() -> Iterator[None]:
    """Swap the console handlers of the ``tprd``/``fvcore`` loggers for :class:`_BarLogHandler`."""
    swapped: List[Tuple[logging.Logger, logging.Handler, logging.Handler]] = []
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        for h in list(logger.handlers):
            if type(h) is logging.StreamHandler and h.stream in (sys.stdout, sys.stderr):
                new = _BarLogHandler(h)
                logger.removeHandler(h)
                logger.addHandler(new)
                swapped.append((logger, h, new))
    try:
        yield
    finally:
        for logger, old, new in swapped:
            logger.removeHandler(new)
            logger.addHandler(old)


@contextlib.contextmanager
def progress_bar(
    total: Optional[int],
    desc: str,
    unit: str = "it",
    initial: int = 0,
    file: Optional[IO] = None,
    enabled: Optional[bool] = None,
    bar_format: Optional[str] = None,
    **tqdm_kwargs: Any,
) -> Iterator[Any]:
    """A tqdm bar over ``total`` units (``initial`` done already), or a :class:`NoBar`.

    ``enabled``: None = :func:`bar_enabled` (main process and a terminal). ``bar_format``
    defaults to :data:`UNITS_PER_SECOND`. The bar is closed (and the console logging restored)
    when the block ends, also on an exception.
    """
    stream = file if file is not None else sys.stderr
    if not (bar_enabled(stream) if enabled is None else enabled):
        yield NoBar()
        return
    from tqdm import tqdm

    fmt = bar_format or UNITS_PER_SECOND
    if total is None:  # no percentage, no ETA
        fmt = fmt.replace("{percentage:3.0f}%|{bar}| ", "").replace("/{total_fmt}", "").replace("<{remaining}", "")
    bar = tqdm(total=total, desc=desc, unit=unit, initial=initial, file=stream, bar_format=fmt,
               dynamic_ncols=True, **tqdm_kwargs)
    try:
        with _console_logs_above_bars():
            yield bar
    finally:
        bar.close()
