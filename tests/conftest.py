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
