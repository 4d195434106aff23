"""``fair run CONFIG --ray``: the FAIR pipeline over blocks of problems (``pipeline.Job`` per
block in the workers); the same records, manifest and exit codes as one process."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fairdistill.engine.config import RunConfig, dump_config
from fairdistill.engine.errors import AbortRun, ConfigError, FairError
from fairdistill.engine.fair import datasets
from fairdistill.engine.fair.budget import BudgetReached
from fairdistill.engine.fair.pipeline import KINDS, close_fair, fair_outcome
from fairdistill.engine.fair.report import write_report
from fairdistill.engine.inputs import BadLines
from fairdistill.engine.options import Outcome, RayOptions, RunOptions
from fairdistill.engine.progress import Progress
from fairdistill.engine.rundir.store import RunStore
from fairdistill.engine.scale.driver import (
    Driver,
    Stop,
    attempt_endpoints,
    attempt_snapshot,
    close_metrics,
    count_calls,
    done_blocks,
    ray_fields,
    refuse_single_process,
    seal_all,
)
from fairdistill.engine.scale.metrics import serve_cluster
from fairdistill.engine.scale.plan import RUN_BLOCK, Block, Plan, ProblemBlocks, run_plan, settle
from fairdistill.engine.scale.results import RunBlockResult


def check_fair(cfg: RunConfig, run_dir: Path) -> None:
    """A Ray run resumes only a Ray run directory, and sends no endpoint to a Batch API."""
    refuse_single_process(run_dir)
    if any(ep.mode == "batch" for ep in cfg.endpoints.values()):
        raise ConfigError(
            'endpoints with mode = "batch" are not supported with --ray (a Batch API needs no cluster)'
        )


def fair_plan(cfg: RunConfig, run_dir: Path, block_size: int | None) -> Plan:
    """The run's block plan (made once, from the dataset's ids; bad lines reported here)."""
    bad = BadLines()  # the first pass (ids only, for the plan) reports bad lines; the second is quiet

    def ids() -> Iterator[str]:
        return (p.id for p in datasets.iter_problems(cfg.dataset, errors=bad))

    plan = settle(run_dir, lambda size: run_plan(ids(), cfg.dataset.name, size), block_size, RUN_BLOCK)
    bad.close()
    return plan


def block_feed(cfg: RunConfig, plan: Plan, todo: list[Block]) -> ProblemBlocks:
    """The problems of the blocks to run, read again as blocks are handed out."""
    problems = datasets.iter_problems(cfg.dataset, errors=BadLines(report=False))
    return ProblemBlocks(problems, plan, {b.id for b in todo})


def run_fair(opts: RunOptions, ray: RayOptions, cfg: RunConfig, run_dir: Path) -> Outcome:
    """Run the blocks not done; the outcome (its ``error``: what stopped the run, or the cap)."""
    check_fair(cfg, run_dir)
    plan = fair_plan(cfg, run_dir, ray.block_size)
    finished = done_blocks(run_dir, frozenset({"done"}))
    todo = [b for b in plan.blocks if b.id not in finished]
    feed = block_feed(cfg, plan, todo)
    bar = Progress(plan.items, label="problems", enabled=opts.progress)
    bar.resumed = sum(b.count for b in plan.blocks if b.id in finished)

    def done(block: Block, res: RunBlockResult) -> None:
        feed.drop(block.id)
        bar.advance(block.count)
        count_calls(bar, attempt_snapshot(run_dir, f"{block.id}.e{res.epoch}"))

    def submit(actor: Any, block: Block, epoch: int) -> Any:
        return actor.run.remote(str(run_dir), cfg, block.id, epoch, feed.get(block))

    (run_dir / "config.toml").write_bytes(dump_config(cfg))
    limits = dict(cfg.endpoints)  # their admissions (a KeyPool for `keys`) live in the limiter actor
    cap = cfg.run.max_cost_usd
    driver = Driver(run_dir, ray.address, ray.workers or 2, limits, list(cfg.endpoints), cap)
    status, results, stop, t_run = "interrupted", [], None, 0.0
    metrics = serve_cluster(driver, opts.metrics_port, stages=True)
    try:
        driver.start()
        t_run = time.monotonic()
        with bar:
            results = driver.run(todo, submit, done)
        failed = [p for r in results for p in r.failed_problems]
        status = "budget" if driver.budget_stopped else "done_with_failures" if failed else "done"
    except Stop as exc:
        stop, results = exc.error, [r for r in exc.results if isinstance(r, RunBlockResult)]
        status = "aborted" if isinstance(exc.error, AbortRun) else "interrupted"
    finally:
        run_s = time.monotonic() - t_run if t_run else 0.0  # start-up and shut-down are apart
        close_metrics(metrics)
        driver.stop()
        spent = _close(run_dir, cfg, driver, plan, status, len(todo), run_s)
        write_report(run_dir)
    failed = [p for r in results for p in r.failed_problems]
    outcome = fair_outcome(run_dir, failed)
    outcome.error = stop or _cap_reached(driver, cap, spent, run_dir)
    return outcome


def _close(
    run_dir: Path, cfg: RunConfig, driver: Driver, plan: Plan, status: str, todo: int, run_s: float
) -> float:
    """Seal what dead attempts left, write the run's manifest; the dollars spent (every attempt,
    every run)."""
    seal_all(run_dir, KINDS)
    store = RunStore(run_dir).open(KINDS)
    endpoints = attempt_endpoints(run_dir)
    spent = sum(float(e.get("cost_usd") or 0.0) for e in endpoints.values())
    budget = {"budget": {"cap_usd": cfg.run.max_cost_usd, "spent_usd": round(spent, 6)}}
    close_fair(store, cfg, status, plan.items, endpoints, budget, ray=ray_fields(driver, plan, todo, run_s))
    return spent


def _cap_reached(driver: Driver, cap: float | None, spent: float, run_dir: Path) -> FairError | None:
    if not driver.budget_stopped:
        return None
    return BudgetReached(
        f"run.max_cost_usd = {cap:g} reached (${spent:.4f} spent in {run_dir}); raise it and run "
        "again to go on (nothing is paid twice)"
    )
