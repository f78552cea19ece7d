"""Reading one dotted entry of a config that may lack it (plain dicts and OmegaConf nodes alike)."""
from __future__ import annotations

from collections import abc
from typing import Any

__all__ = ["select_value"]


def select_value(cfg: Any, dotted: str, default: Any = None) -> Any:
    """``cfg["a"]["b"]...`` for ``dotted = "a.b..."``, or ``default`` when a part is missing, is not
    a mapping, or the value is ``None``."""
    node = cfg
    for part in dotted.split("."):
        if isinstance(node, abc.Mapping) or hasattr(node, "keys"):
            if part not in node:
                return default
            node = node[part]
        else:
            return default
        if node is None:
            return default
    return node
