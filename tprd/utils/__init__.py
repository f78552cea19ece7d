"""Low-level helpers every layer of the package may import (they import nothing from ``tprd``):
:mod:`~tprd.utils.comm` (process rank and world size) and :mod:`~tprd.utils.events` (the event
storage that carries the iteration and per-iteration statistics between trainer and model)."""
