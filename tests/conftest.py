"""Shared fixtures: where the offline datasets live.

Tests that need ``../shared/datasets`` skip with the reason when it is absent, unless
``FAIR_REQUIRE_DATA=1`` (set by ``.ci/run``): then they fail, so CI cannot pass by skipping.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A shell without job control starts a background command (`.ci/run &`) with SIGINT ignored, and
# an ignored signal stays ignored across exec: every `fair` child the Ctrl-C tests start would
# shrug their SIGINT off. A handler here resets it to the default in every child.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def data_dir() -> Path | None:
    """$FAIR_DATA_DIR, else ../shared/datasets beside the project; None when absent."""
    env = os.environ.get("FAIR_DATA_DIR")
    for candidate in ([Path(env)] if env else []) + [ROOT.parent / "shared" / "datasets"]:
        if candidate.is_dir():
            return candidate
    return None


def missing_data(reason: str) -> None:
    """Skip for ``reason``, or fail under ``FAIR_REQUIRE_DATA=1`` (CI has the data)."""
    if os.environ.get("FAIR_REQUIRE_DATA") == "1":
        pytest.fail(f"FAIR_REQUIRE_DATA=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def need_file(path: Path) -> Path:
    """``path`` if it is a file, else skip (or fail under FAIR_REQUIRE_DATA=1)."""
    if not path.is_file():
        missing_data(f"{path} absent")
    return path


@pytest.fixture
def datasets_dir() -> Path:
    d = data_dir()
    if d is None:
        missing_data("reference datasets absent: set FAIR_DATA_DIR or provide ../shared/datasets")
    return d
