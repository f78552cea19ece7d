"""The deterministic ``crc32-randn-v1`` weight fill of the parity fixtures (tests/fixtures/reference/README.md).

Every floating-point entry of a detrex-named state dict gets a value drawn from a CPU generator
seeded with the CRC-32 of its key; keys that alias one tensor all receive the value of the
lexicographically smallest key of their group.
"""
from __future__ import annotations

import math
import zlib
from typing import Dict, Iterable, List, Sequence

import torch

FILL_RULE = "crc32-randn-v1"

# Embedding tables and level embeddings are drawn with unit standard deviation.
_UNIT_STD_SUFFIXES = (
    "query_embedding.weight",
    "anchor_box_embed.weight",
    "tgt_embed.weight",
    "label_enc.weight",
    "level_embeds",
)


def _is_unit_std(key: str) -> bool:
    return any(key == s or key.endswith("." + s) for s in _UNIT_STD_SUFFIXES)


def fill_value(key: str, shape: Sequence[int]) -> torch.Tensor:
    """The float32 value the fill rule assigns to ``key`` with ``shape``."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(zlib.crc32(key.encode("utf-8")))
    z = torch.randn(tuple(shape), generator=gen, dtype=torch.float32)
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "running_var":
        return 1.0 + 0.1 * z.abs()
    if leaf == "running_mean":
        return 0.1 * z
    if len(shape) <= 1:
        return 1.0 + 0.1 * z if leaf == "weight" else 0.1 * z
    if _is_unit_std(key):
        return z
    return z / math.sqrt(math.prod(shape[1:]))


def fill_state_dict(
    keys_and_shapes: Iterable[Sequence], alias_groups: List[List[str]] = ()
) -> Dict[str, torch.Tensor]:
    """Build a detrex-named state dict filled by the rule.

    ``keys_and_shapes``: ``[key, shape, dtype]`` rows as in a fixture's ``keys.json``; non-float
    dtypes are skipped. Every key of an alias group gets the value of the group's smallest key.
    """
    rows = [r for r in keys_and_shapes if "float" in str(r[2])]
    smallest = {}
    for group in alias_groups:
        first = min(group)
        for k in group:
            smallest[k] = first
    out: Dict[str, torch.Tensor] = {}
    for key, shape, _ in sorted(rows, key=lambda r: r[0]):
        src = smallest.get(key, key)
        out[key] = fill_value(src, shape)
    return out
