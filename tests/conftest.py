"""Shared test fixtures: paths to the reference data, small thread counts.

The reference data (detrex and distillation parity fixtures, official key lists) lives in this
repository under ``tests/fixtures/reference/`` (see its README); ``TPRD_REFERENCE_DIR`` points the
tests at another copy, ``TPRD_PARITY_DIR`` at another folder of detector parity fixtures.
"""
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
REFERENCE_DIR = Path(os.environ.get("TPRD_REFERENCE_DIR", REPO / "tests" / "fixtures" / "reference"))
PARITY_DIR = Path(os.environ.get("TPRD_PARITY_DIR", REFERENCE_DIR / "parity"))
DISTILL_PARITY_DIR = REFERENCE_DIR / "distill_parity"
DETREX_KEYS_DIR = REFERENCE_DIR / "detrex_keys"
RTDETR_KEYS_DIR = REFERENCE_DIR / "rtdetr_keys"

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def parity_dir() -> Path:
    if not PARITY_DIR.is_dir():
        pytest.fail(f"parity fixtures not found at {PARITY_DIR}; set TPRD_PARITY_DIR")
    return PARITY_DIR


def filled_fixture_model(name: str):
    """The detector of parity fixture ``name`` built from its detrex config, filled with the
    crc32-randn-v1 rule and loaded strictly (fill checksums verified), in eval mode."""
    from tprd.testing.parity import build_model, fill_model, load_fixture

    folder = PARITY_DIR / name
    if not folder.is_dir():
        pytest.fail(f"parity fixture {name!r} not found at {folder}; set TPRD_PARITY_DIR")
    fixture = load_fixture(folder)
    model = build_model(fixture)
    _, checks = fill_model(model, fixture)
    failed = [c for c in checks if not c.ok]
    assert not failed, f"filling {name} failed: {failed}"
    return model.eval()


def padded_feature_pair(channels: int, level_shapes, small=(48, 64), big=(64, 96), seed: int = 1):
    """Neck features of one small image alone and padded into a 2-image batch (image 1), with the
    matching masks: ``(feats_alone, masks_alone, feats_batch, masks_batch)``. ``level_shapes(h, w)``
    gives the per-level ``(h_l, w_l)`` of an ``h x w`` input; masks use the exact rule."""
    from tprd.modeling.detector import level_masks

    g = torch.Generator().manual_seed(seed)
    small_shapes, big_shapes = level_shapes(*small), level_shapes(*big)
    feats_alone = [torch.randn(1, channels, h, w, generator=g) for h, w in small_shapes]
    feats_batch = [torch.randn(2, channels, h, w, generator=g) * 3 for h, w in big_shapes]
    for f, a in zip(feats_batch, feats_alone):
        f[1, :, : a.shape[2], : a.shape[3]] = a[0]
    pad_mask = torch.ones(2, *big, dtype=torch.bool)
    pad_mask[0] = False
    pad_mask[1, : small[0], : small[1]] = False
    masks_batch = level_masks(pad_mask, [big, small], big_shapes, "exact")
    masks_alone = [torch.zeros(1, h, w, dtype=torch.bool) for h, w in small_shapes]
    return feats_alone, masks_alone, feats_batch, masks_batch
