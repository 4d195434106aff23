"""``fair run CONFIG --estimate --ray``: the pilot as Ray blocks, then the single-process projection.

The pilot is the first ``--pilot`` problems of the run's block plan, run as block attempts on
the workers: the blocks it covers whole are done (the full run skips them); the block it covers
in part runs only its first problems, and that attempt is stored as ``pilot``, not done
(``worker.FencedStore``), so the full ``--ray`` run redoes the block under a new epoch and adopts
the slice's records and cache: nothing is paid twice. The projection is ``engine.fair.budget``'s
(calls, tokens, dollars and wall time per endpoint and stage, online and batch) over the run
directory's trace; ``wall_s_online`` scales the pilot's wall time (Ray start-up excluded).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec

from engine.errors import AbortRun
from engine.rundir.store import RunStore, iter_raw
from engine.scale.driver import (
    Driver,
    _attempt_endpoints,
    _refuse_single_process,
    _Stop,
    done_blocks,
    seal_all,
)
from engine.scale.plan import Block


def estimate(args: Any, cfg: Any, run_dir: Path) -> int:
    """Run the pilot blocks, print the projection, write ``estimate.json``; 0, or the run's error."""
    from engine.config import dump_config
    from engine.fair import datasets
    from engine.fair.budget import project, render
    from engine.fair.pipeline import KINDS, _BadLines, _more_bad
    from engine.scale.plan import RUN_BLOCK, ProblemBlocks, run_plan, settle

    _refuse_single_process(run_dir)
    bad = _BadLines()

    def ids() -> Iterator[str]:
        return (p.id for p in datasets.iter_problems(cfg.dataset, errors=bad))

    plan = settle(run_dir, lambda size: run_plan(ids(), cfg.dataset.name, size), args.block_size, RUN_BLOCK)
    _more_bad(bad)
    pilot = min(args.pilot, plan.items)
    share = {b.id: min(b.count, pilot - b.start) for b in plan.blocks if b.start < pilot}
    finished = done_blocks(run_dir, frozenset({"done"}))
    todo = [b for b in plan.blocks if b.id in share and b.id not in finished]
    feed = ProblemBlocks(
        datasets.iter_problems(cfg.dataset, errors=_BadLines(report=False)), plan, {b.id for b in todo}
    )
    (run_dir / "config.toml").write_bytes(dump_config(cfg))
    limits = {n: (ep.concurrency, ep.rpm, ep.tpm) for n, ep in cfg.endpoints.items()}
    workers = max(1, min(args.workers or 2, len(todo)))
    driver = Driver(run_dir, args.ray, workers, limits, list(cfg.endpoints), cfg.run.max_cost_usd)

    def submit(actor: Any, block: Block, epoch: int) -> Any:
        n = share[block.id]
        return actor.run.remote(str(run_dir), cfg, block.id, epoch, feed.get(block)[:n], n < block.count)

    def done(block: Block, res: dict[str, Any]) -> None:
        feed.drop(block.id)

    status, stop, wall = "interrupted", None, 0.0
    try:
        if todo:
            driver.start()
            t0 = time.monotonic()
            driver.run(todo, submit, done)
            wall = time.monotonic() - t0
        status = "pilot"
    except _Stop as exc:
        stop = exc.error
        status = "aborted" if isinstance(exc.error, AbortRun) else "interrupted"
    finally:
        driver.stop()
        seal_all(run_dir, KINDS)
        store = RunStore(run_dir).open(KINDS)
        store.close(status, {"problems_total": plan.items, "endpoints": _attempt_endpoints(run_dir)})
    if stop is not None:
        raise stop
    covered = sum(1 for _ in iter_raw(run_dir, "problems"))  # a re-estimate reads the same trace
    est = project(cfg, run_dir, plan.items, covered or pilot, wall)
    (run_dir / "estimate.json").write_bytes(msgspec.json.format(msgspec.json.encode(est)))
    print(render(est))
    print(
        f"run directory: {run_dir} (the full run with --ray resumes from the pilot; "
        f"{len(share)} of {len(plan.blocks)} blocks piloted)",
        file=sys.stderr,
    )
    return 0
