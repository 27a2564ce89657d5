"""Shared pytest fixtures: paths to the shared data and small helpers."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_HAM = REPO.parent / "shared" / "data" / "ham10000"


@pytest.fixture(scope="session")
def ham_dir() -> Path:
    """The real HAM10000 folder from ../shared/data (skips the test when it is absent)."""
    if not (SHARED_HAM / "HAM10000_metadata.csv").is_file():
        pytest.skip(f"{SHARED_HAM} is not present")
    return SHARED_HAM
