"""``fair run CONFIG --estimate --ray``: the pilot as Ray blocks, then the single-process projection.

The pilot is the first ``--pilot`` problems of the run's block plan, run as block attempts on
the workers: the blocks it covers whole are done (the full run skips them); the block it covers
in part runs only its first problems, and that attempt is stored as ``pilot``, not done
(``worker.FencedStore``), so the full ``--ray`` run redoes the block under a new epoch and adopts
the slice's records and cache: nothing is paid twice. The projection is ``engine.fair.budget``'s
(calls, tokens, dollars and wall time per endpoint and stage, online and batch) over the run
directory's trace; ``wall_s_online`` scales the pilot's wall time (Ray start-up excluded), or is
the time the endpoints' capacity needs (``engine.fair.estimate.at_capacity``: a key pool counts
every live key, within its group's and the endpoint's limits), whichever is longer. The pilot's
limiter gets each pool's config, like the full run's.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from fairdistill.engine.config import RunConfig, dump_config
from fairdistill.engine.errors import AbortRun, FairError
from fairdistill.engine.fair.budget import project
from fairdistill.engine.fair.estimate import at_capacity, projection
from fairdistill.engine.fair.pipeline import KINDS
from fairdistill.engine.options import Outcome, RayOptions, RunOptions
from fairdistill.engine.rundir.store import RunStore, iter_raw
from fairdistill.engine.scale.driver import Driver, Stop, attempt_endpoints, done_blocks, seal_all
from fairdistill.engine.scale.fairrun import block_feed, check_fair, fair_plan
from fairdistill.engine.scale.plan import Block
from fairdistill.engine.scale.results import RunBlockResult


def estimate(opts: RunOptions, ray: RayOptions, cfg: RunConfig, run_dir: Path) -> Outcome:
    """Run the pilot blocks, write ``estimate.json``; the projection (or the run's error)."""
    check_fair(cfg, run_dir)
    plan = fair_plan(cfg, run_dir, ray.block_size)
    pilot = min(opts.pilot, plan.items)
    share = {b.id: min(b.count, pilot - b.start) for b in plan.blocks if b.start < pilot}
    finished = done_blocks(run_dir, frozenset({"done"}))
    todo = [b for b in plan.blocks if b.id in share and b.id not in finished]
    feed = block_feed(cfg, plan, todo)
    (run_dir / "config.toml").write_bytes(dump_config(cfg))
    limits = dict(cfg.endpoints)  # as the full run's (fairrun): a KeyPool for `keys`, in the limiter
    workers = max(1, min(ray.workers or 2, len(todo)))
    driver = Driver(run_dir, ray.address, workers, limits, list(cfg.endpoints), cfg.run.max_cost_usd)

    def submit(actor: Any, block: Block, epoch: int) -> Any:
        n = share[block.id]
        return actor.run.remote(str(run_dir), cfg, block.id, epoch, feed.get(block)[:n], n < block.count)

    def done(block: Block, res: RunBlockResult) -> None:
        feed.drop(block.id)

    status, stop, wall = "interrupted", None, 0.0
    try:
        if todo:
            driver.start()
            t0 = time.monotonic()
            driver.run(todo, submit, done)
            wall = time.monotonic() - t0
        status = "pilot"
    except Stop as exc:
        stop = exc.error
        status = "aborted" if isinstance(exc.error, AbortRun) else "interrupted"
    finally:
        driver.stop()
        seal_all(run_dir, KINDS)
        store = RunStore(run_dir).open(KINDS)
        store.close(status, {"problems_total": plan.items, "endpoints": attempt_endpoints(run_dir)})
    return _projection(cfg, run_dir, plan.items, pilot, wall, f"{len(share)} of {len(plan.blocks)}", stop)


def _projection(cfg: RunConfig, run_dir: Path, total: int, pilot: int, wall: float, piloted: str,
                stop: FairError | None) -> Outcome:  # fmt: skip
    if stop is not None:
        return Outcome(run_dir, "aborted", error=stop)
    covered = sum(1 for _ in iter_raw(run_dir, "problems"))  # a re-estimate reads the same trace
    est = at_capacity(cfg, run_dir, project(cfg, run_dir, total, covered or pilot, wall))
    line = (
        f"run directory: {run_dir} (the full run with --ray resumes from the pilot; {piloted} blocks piloted)"
    )
    return projection(run_dir, est, line)
