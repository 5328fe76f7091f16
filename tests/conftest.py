"""Shared fixtures: the real survey files the tests read.

``real_data`` is ``tests/data``, a small set of real SDSS/LAMOST files committed with the
tests (every reader format; see tests/data/PROVENANCE.md), so ``make test`` works on a fresh
clone with nothing beside it. ``full_data`` is the fuller set of ``../shared/data`` beside the
checkout (or ``$SPECTRANSFER_SHARED_DATA``); a test that asks for it is skipped, with the
reason, where that set is absent. ``real_files`` lists the in-repo files of one survey plus,
when the fuller set is present, its other files, so a run with the fuller set (CI) still
checks every file.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REAL_DATA = ROOT / "tests" / "data"
FULL_DATA = Path(os.environ.get("SPECTRANSFER_SHARED_DATA", ROOT.parent / "shared" / "data"))
FULL_DATA_MISSING = f"fuller real-file set not found at {FULL_DATA} (set SPECTRANSFER_SHARED_DATA)"


def full_data_present() -> bool:
    return (FULL_DATA / "PROVENANCE.md").is_file()


def real_files(survey: str) -> list[Path]:
    """Spectrum files of ``survey`` ('sdss' | 'lamost'): the in-repo ones, then the fuller set's others."""
    files = sorted(p for p in (REAL_DATA / survey).iterdir() if p.is_file())
    if full_data_present() and (FULL_DATA / survey).is_dir():
        have = {p.name for p in files}
        files += sorted(p for p in (FULL_DATA / survey).iterdir() if p.is_file() and p.name not in have)
    return files


@pytest.fixture(scope="session")
def real_data() -> Path:
    """tests/data: real files in sdss/, lamost/ and catalogs/, always present."""
    return REAL_DATA


@pytest.fixture(scope="session")
def full_data() -> Path:
    """The fuller ../shared/data set; skips the test where it is absent."""
    if not full_data_present():
        pytest.skip(FULL_DATA_MISSING)
    return FULL_DATA


@pytest.fixture(scope="session")
def shared_data(full_data: Path) -> Path:
    """The fuller set under its old name, for tests written before tests/data existed: they
    run where ../shared/data is present and skip elsewhere. New tests use ``real_data``."""
    return full_data
