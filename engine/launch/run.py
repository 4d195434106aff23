"""``fair run CONFIG``: one process, a priced ``--estimate`` pilot, or Ray (``--ray``)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from fairdistill.engine.config import RunConfig, check_output_dir, load_config
from fairdistill.engine.fair.estimate import estimate_outcome
from fairdistill.engine.fair.pipeline import fair_outcome, run_job
from fairdistill.engine.fair.student_server import student_server
from fairdistill.engine.launch.finish import finish_run
from fairdistill.engine.options import Outcome, RunOptions
from fairdistill.engine.scale import check_ray


def launch_run(opts: RunOptions) -> int:
    """Run the job the options describe and end it (``finish_run``); the exit code."""
    cfg = load_config(opts.config)
    run_dir = check_output_dir(opts.run_dir, "--run-dir")
    check_ray(opts.ray, batch=False)
    with student_server(cfg, run_dir / "logs"):  # round 2: serves [student] adapter, if set
        outcome = _mode(opts, cfg, run_dir)
    return finish_run(outcome)


def _mode(opts: RunOptions, cfg: RunConfig, run_dir: Path) -> Outcome:
    """Single process, ``--estimate``, or ``--ray`` (``engine.scale``, imported only then)."""
    if opts.ray is not None:  # scale-out: imports ray only now
        from fairdistill.engine.scale.estimate import estimate
        from fairdistill.engine.scale.fairrun import run_fair

        if opts.estimate:
            return estimate(opts, opts.ray, cfg, run_dir)
        return run_fair(opts, opts.ray, cfg, run_dir)
    if opts.estimate:  # a pilot slice, then the projection (engine.fair.budget)
        return asyncio.run(estimate_outcome(cfg, run_dir, opts.pilot))
    summary = asyncio.run(run_job(cfg, run_dir, progress=opts.progress, metrics_port=opts.metrics_port))
    return fair_outcome(run_dir, summary["failed_problems"])


async def run_config(
    cfg: RunConfig, run_dir: Path, *, progress: bool = True, metrics_port: int | None = None
) -> dict:
    """One process on a loaded config, the student served when it is an adapter (round 2); the
    job's summary (``fairdistill.arun``: inside a running event loop)."""
    with student_server(cfg, run_dir / "logs"):
        return await run_job(cfg, run_dir, progress=progress, metrics_port=metrics_port)
