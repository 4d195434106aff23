"""What a block attempt reports back to the driver (``worker.BlockWorker``), typed.

``status`` says how the attempt ended: done, done_with_failures, budget, aborted, config_error,
fenced (or ``pilot`` for a slice of ``--estimate``); ``error`` the one line when it did not finish.
"""

from __future__ import annotations

from typing import Any

import msgspec


class BlockResult(msgspec.Struct, kw_only=True):
    """The common part of a block attempt's result."""

    status: str
    error: str | None = None
    block: str
    epoch: int
    worker: str


class RunBlockResult(BlockResult, kw_only=True):
    """A ``fair run`` block: the problems that failed and the stage counts."""

    failed_problems: list[str] = []
    counts: dict[str, int] = {}


class GenerateBlockResult(BlockResult, kw_only=True):
    """A ``fair generate`` block: its summary (``generate.run_summary``) and the worker's
    cumulative limiter traffic."""

    summary: dict[str, Any] = {}
    proxy: dict[str, int] = {}
