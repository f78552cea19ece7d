"""Lazy, Python-file configs (detectron2-style LazyConfig without detectron2).

>>> from tprd.config import LazyCall as L, LazyConfig, instantiate
>>> model = L(dict)(a=1)            # nothing is built yet
>>> instantiate(model)
{'a': 1}
"""
from .instantiate import InstantiationError, dotted_name, instantiate, locate
from .select import select_value
from .lazy import (
    ConfigLoadError,
    ConfigOverrideError,
    L,
    LazyCall,
    LazyConfig,
    config_root,
    get_config,
    normalize_config,
)

__all__ = [
    "select_value",
    "LazyCall",
    "L",
    "LazyConfig",
    "instantiate",
    "locate",
    "dotted_name",
    "get_config",
    "config_root",
    "normalize_config",
    "ConfigLoadError",
    "ConfigOverrideError",
    "InstantiationError",
]
