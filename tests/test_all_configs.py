"""Every config file in the repository loads, accepts an override and survives save/load.

Discovered at collection time: ``configs/**/*.py``, ``projects/*/configs/**/*.py`` and
``projects/*/cfg_distill/**/*.py`` (``models/`` folders included, ``__init__.py`` skipped), plus the
smoke config under ``tests/fixtures_config/`` so the path is exercised even with no repo configs.
"""
from collections import abc
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from tprd.config import LazyConfig, normalize_config

REPO = Path(__file__).resolve().parents[1]
SMOKE = Path(__file__).resolve().parent / "fixtures_config" / "smoke.py"
PATTERNS = ("configs/**/*.py", "projects/*/configs/**/*.py", "projects/*/cfg_distill/**/*.py")


def discover_configs():
    found = set()
    for pattern in PATTERNS:
        for path in REPO.glob(pattern):
            if path.is_file() and path.name != "__init__.py" and "__pycache__" not in path.parts:
                found.add(path.resolve())
    return sorted(found) + [SMOKE]


CONFIG_FILES = discover_configs()


def _ids(path: Path) -> str:
    try:
        return path.relative_to(REPO).as_posix()
    except ValueError:  # pragma: no cover - outside the repository
        return str(path)


def first_scalar_leaf(cfg):
    """Dotted path and value of the first overridable scalar leaf (walking in key order)."""
    plain = OmegaConf.to_container(cfg, resolve=False)

    def walk(node, prefix):
        if isinstance(node, abc.Mapping):
            items = node.items()
        elif isinstance(node, list):
            items = enumerate(node)
        else:
            return None
        for key, value in items:
            if key == "_target_" or (isinstance(key, str) and not key.replace("_", "a").isalnum()):
                continue
            path = f"{prefix}.{key}" if prefix else str(key)
            if value is None or isinstance(value, (bool, int, float)):
                return path, value
            if isinstance(value, str) and "${" not in value and not value.startswith("<"):
                return path, value
            hit = walk(value, path)
            if hit is not None:
                return hit
        return None

    return walk(plain, "")


def changed_value(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 2 + 1.0
    if value is None:
        return 17
    return value + "_overridden"


def select(cfg, dotted):
    node = cfg
    for part in dotted.split("."):
        node = node[int(part)] if not isinstance(node, DictConfig) else node[part]
    return node


def test_discovery_is_not_empty():
    assert CONFIG_FILES, "no config files discovered"
    assert SMOKE in CONFIG_FILES and SMOKE.is_file()


@pytest.mark.parametrize("path", CONFIG_FILES, ids=_ids)
def test_config_loads_overrides_and_round_trips(path, tmp_path):
    cfg = LazyConfig.load(path)
    assert isinstance(cfg, DictConfig)

    # Loading must never build models.
    for value in _all_values(OmegaConf.to_container(cfg, resolve=False)):
        assert not isinstance(value, torch.nn.Module), f"{path} builds a module at load time"

    # A second load is an independent copy.
    again = LazyConfig.load(path)

    leaf = first_scalar_leaf(cfg)
    if leaf is not None:
        key, old = leaf
        new = changed_value(old)
        LazyConfig.apply_overrides(cfg, [f"{key}={new!r}"])
        assert select(cfg, key) == new and select(cfg, key) != old
        assert select(again, key) == old

    out = tmp_path / "config.yaml"
    LazyConfig.save(cfg, out)
    back = LazyConfig.load(out)
    assert normalize_config(back) == normalize_config(cfg)


def _all_values(node):
    if isinstance(node, abc.Mapping):
        for v in node.values():
            yield v
            yield from _all_values(v)
    elif isinstance(node, (list, tuple)):
        for v in node:
            yield v
            yield from _all_values(v)
