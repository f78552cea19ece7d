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
