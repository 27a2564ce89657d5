"""Shared pytest fixtures: the real photos shipped in data/demo/."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "demo"  # 500 real HAM10000 photos (400 nv, 100 mel) + metadata.csv


@pytest.fixture(scope="session")
def ham_dir() -> Path:
    """data/demo: real HAM10000 JPEGs in images/ and their metadata.csv (ships with the repo)."""
    assert (DEMO / "metadata.csv").is_file(), f"{DEMO} is missing; it ships with the repository"
    return DEMO


FULL_HAM = REPO.parent / "shared" / "data" / "ham10000"  # all 10,015 images; CI has it beside


@pytest.fixture(scope="session")
def full_ham_metadata() -> Path:
    """The full HAM10000_metadata.csv from ../shared/data (the project never copies it)."""
    path = FULL_HAM / "HAM10000_metadata.csv"
    if not path.is_file():
        pytest.skip(f"{path} is absent: this check needs all of HAM10000 beside the repository")
    return path
