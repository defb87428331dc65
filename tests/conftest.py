"""Shared test fixtures: where ../shared lives, and small helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("HALLO3_SHARED", REPO.parent / "shared")).resolve()
OFFICIAL = SHARED / "fixtures" / "official"
MEDIA = SHARED / "fixtures" / "media"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared fixture {path} is not available (set HALLO3_SHARED)")
    return path


@pytest.fixture(scope="session")
def official_dir() -> Path:
    return _need(OFFICIAL)


@pytest.fixture(scope="session")
def media_dir() -> Path:
    return _need(MEDIA)
