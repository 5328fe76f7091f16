"""Shared fixtures: where the real survey files live, and small simulated surveys."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The real SDSS/LAMOST files and their PROVENANCE.md sit in ../shared/data beside the checkout.
SHARED_DATA = Path(os.environ.get("SPECTRANSFER_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"real survey files not found at {SHARED_DATA} (set SPECTRANSFER_SHARED_DATA)")
    return SHARED_DATA
