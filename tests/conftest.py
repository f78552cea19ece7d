"""Shared test fixtures: paths to the shared reference data, small thread counts."""
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TPRD_SHARED_DIR", REPO.parent / "shared"))
PARITY_DIR = Path(os.environ.get("TPRD_PARITY_DIR", SHARED / "reference" / "parity"))
DETREX_KEYS_DIR = SHARED / "reference" / "detrex_keys"

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def parity_dir() -> Path:
    if not PARITY_DIR.is_dir():
        pytest.fail(f"parity fixtures not found at {PARITY_DIR}; set TPRD_PARITY_DIR")
    return PARITY_DIR


def filled_fixture_model(name: str):
    """The detector of parity fixture ``name`` built from its detrex config, filled with the
    crc32-randn-v1 rule and loaded strictly (fill checksums verified), in eval mode."""
    from tprd.checkpoint.parity import build_model, fill_model, load_fixture

    folder = PARITY_DIR / name
    if not folder.is_dir():
        pytest.fail(f"parity fixture {name!r} not found at {folder}; set TPRD_PARITY_DIR")
    fixture = load_fixture(folder)
    model = build_model(fixture)
    _, checks = fill_model(model, fixture)
    failed = [c for c in checks if not c.ok]
    assert not failed, f"filling {name} failed: {failed}"
    return model.eval()
