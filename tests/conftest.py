"""Shared fixtures: where the offline datasets live."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def data_dir() -> Path | None:
    """$FAIR_DATA_DIR, else ../shared/datasets beside the project; None when absent."""
    env = os.environ.get("FAIR_DATA_DIR")
    for candidate in ([Path(env)] if env else []) + [ROOT.parent / "shared" / "datasets"]:
        if candidate.is_dir():
            return candidate
    return None


@pytest.fixture
def datasets_dir() -> Path:
    d = data_dir()
    if d is None:
        pytest.skip("reference datasets absent: set FAIR_DATA_DIR or provide ../shared/datasets")
    return d
