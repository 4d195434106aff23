"""``fair run --estimate``: a pilot slice through the real path, then the projection.

The pilot is the dataset's first ``--pilot`` problems, run by ``pipeline.Job`` with the run's
cache (the full run resumes from it: nothing is paid twice); ``budget.project`` scales its trace
to the whole dataset. ``engine.scale.estimate`` runs the same pilot as Ray blocks.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any

import msgspec

from fairdistill.engine.config import RunConfig
from fairdistill.engine.fair import datasets
from fairdistill.engine.fair.budget import project, render
from fairdistill.engine.fair.pipeline import Job, count_problems
from fairdistill.engine.inputs import BadLines
from fairdistill.engine.options import Outcome
from fairdistill.engine.rundir.store import iter_raw


async def estimate(cfg: RunConfig, run_dir: Path, pilot: int = 20) -> dict[str, Any]:
    """Run the first ``pilot`` problems, then project the whole dataset from the trace."""
    total = count_problems(cfg)
    bad = BadLines()
    slice_ = list(itertools.islice(datasets.iter_problems(cfg.dataset, errors=bad), pilot))
    bad.close()
    started = time.monotonic()
    await Job(cfg, run_dir, progress=False).run(slice_, total=len(slice_))
    wall = time.monotonic() - started
    covered = sum(1 for _ in iter_raw(run_dir, "problems"))  # a re-estimate reads the same trace
    return project(cfg, run_dir, total, covered or len(slice_), wall)


async def estimate_outcome(cfg: RunConfig, run_dir: Path, pilot: int) -> Outcome:
    """``estimate``, written to ``estimate.json`` and said (``finish_run`` prints it)."""
    est = await estimate(cfg, run_dir, pilot=pilot)
    return projection(run_dir, est, f"run directory: {run_dir} (the full run resumes from the pilot)")


def projection(run_dir: Path, est: dict[str, Any], line: str) -> Outcome:
    """Write ``estimate.json``; the projection for stdout and ``line`` for stderr."""
    (run_dir / "estimate.json").write_bytes(msgspec.json.format(msgspec.json.encode(est)))
    return Outcome(run_dir, "pilot", lines=[line], stdout=render(est))
