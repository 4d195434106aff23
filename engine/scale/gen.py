"""``fair generate ... --ray``: the input's lines as blocks on the workers; the same records,
manifest summary and exit codes as the single-process run (``engine.generate``)."""

from __future__ import annotations

import collections
import time
from pathlib import Path
from typing import Any

from fairdistill.engine.config import EndpointConfig
from fairdistill.engine.errors import AbortRun, ConfigError, FairError
from fairdistill.engine.generate import ENDPOINT, KIND, generate_outcome
from fairdistill.engine.options import GenerateOptions, Outcome, RayOptions
from fairdistill.engine.progress import Progress
from fairdistill.engine.rundir.store import RunStore
from fairdistill.engine.scale.driver import (
    Driver,
    Stop,
    attempt_endpoints,
    close_metrics,
    count_calls,
    done_blocks,
    ray_fields,
    refuse_single_process,
    seal_all,
)
from fairdistill.engine.scale.metrics import serve_cluster
from fairdistill.engine.scale.plan import GENERATE_BLOCK, Block, Plan, generate_plan, read_lines, settle
from fairdistill.engine.scale.results import GenerateBlockResult

SUMMED = ("ok", "failed", "skipped_existing", "calls", "cache_hits", "http_429", "retries", "prompt_tokens",
          "completion_tokens", "cost_usd")  # fmt: skip


def run_generate(opts: GenerateOptions, ray: RayOptions) -> Outcome:
    """Plan the blocks, run those not done, merge the manifest; the outcome (its ``error``: what
    stopped the run)."""
    out, input_path, endpoint = opts.output, opts.input, opts.endpoint
    if not input_path.is_file():
        raise ConfigError(f"--input {input_path}: no such file")
    refuse_single_process(out)
    plan = settle(out, lambda size: generate_plan(input_path, size), ray.block_size, GENERATE_BLOCK)
    finished = done_blocks(out)
    todo = [b for b in plan.blocks if b.id not in finished]
    limits = {ENDPOINT: endpoint}  # its admission (a KeyPool for `keys`) lives in the limiter actor
    driver = Driver(out, ray.address, ray.workers or 2, limits, [ENDPOINT])
    bar = Progress(plan.items, label="responses", enabled=opts.progress)
    t0 = time.monotonic()
    status, results, stop, t_run = "interrupted", [], None, 0.0
    metrics = serve_cluster(driver, opts.metrics_port, stages=False)
    try:
        driver.start()
        t_run = time.monotonic()
        bar.resumed = RunStore(out).open([KIND]).count(KIND)

        def submit(actor: Any, block: Block, epoch: int) -> Any:
            lines = list(read_lines(input_path, block))
            return actor.generate.remote(str(out), str(input_path), endpoint, block.id, epoch, lines,
                                         opts.request, opts.cache)  # fmt: skip

        def done(block: Block, res: GenerateBlockResult) -> None:
            bar.advance(res.summary["ok"] + res.summary["failed"])
            count_calls(bar, res.summary)

        with bar:
            results = driver.run(todo, submit, done)
        status = "done"
    except Stop as exc:
        stop, results = exc.error, [r for r in exc.results if isinstance(r, GenerateBlockResult)]
        status = "aborted" if isinstance(exc.error, AbortRun) else "interrupted"
    finally:
        run_s = time.monotonic() - t_run if t_run else 0.0  # start-up and shut-down are apart
        close_metrics(metrics)
        driver.stop()
        summary = _close(
            out, driver, plan, results, status, time.monotonic() - t0, endpoint, len(todo), run_s
        )
    return _outcome(out, summary, driver, plan, len(todo), stop)


def _close(
    out: Path, driver: Driver, plan: Plan, results: list[GenerateBlockResult], status: str, elapsed: float,
    endpoint: EndpointConfig, todo: int, run_s: float,
) -> dict[str, Any]:  # fmt: skip
    """Seal what dead attempts left, write the run's manifest; its ``generate`` summary."""
    seal_all(out, [KIND])
    store = RunStore(out).open([KIND])
    summary = _summary(results, plan, store.count(KIND), status, elapsed, endpoint)
    if summary["failed"] or summary["bad_lines"] or summary["duplicate_ids"]:
        summary["status"] = status = "done_with_failures" if status == "done" else status
    summary["ray"] = ray_fields(driver, plan, todo, run_s)
    summary["ray"]["limiter"] = _proxy_counters(results)
    store.close(status, {"generate": summary, "endpoints": attempt_endpoints(out), "ray": summary["ray"]})
    return summary


def _outcome(out: Path, summary: dict[str, Any], driver: Driver, plan: Plan, todo: int,
             stop: FairError | None) -> Outcome:  # fmt: skip
    outcome = generate_outcome(
        out,
        summary,
        f"fair: {summary['records']} records in {out}/responses ({summary['ok']} new ok, "
        f"{len(plan.blocks) - todo} of {len(plan.blocks)} blocks already done) in "
        f"{summary['elapsed_s']:.1f}s on Ray with {driver.n} workers (start-up {driver.ray_start_s:.1f}s)",
    )
    outcome.error = stop
    return outcome


def _summary(
    results: list[GenerateBlockResult], plan: Plan, records: int, status: str, elapsed: float,
    endpoint: EndpointConfig,
) -> dict[str, Any]:  # fmt: skip
    summed: collections.Counter[str] = collections.Counter()
    failures: list[str] = []
    for r in results:
        for key in SUMMED:
            summed[key] += r.summary.get(key, 0)
        failures += r.summary.get("failures", [])[: 20 - len(failures)]
    done = summed["ok"] + summed["failed"]
    return {
        "status": status,
        "endpoint": {"provider": endpoint.provider, "base_url": endpoint.base_url, "model": endpoint.model},
        "records": records,
        **{k: summed[k] for k in ("ok", "failed", "skipped_existing")},
        "bad_lines": plan.bad_lines,
        "duplicate_ids": plan.duplicate_ids,
        "elapsed_s": round(elapsed, 3),
        "records_per_s": round(done / elapsed, 2) if elapsed > 0 else 0.0,
        **{
            k: summed[k]
            for k in ("calls", "cache_hits", "http_429", "retries", "prompt_tokens", "completion_tokens")
        },
        "cost_usd": round(summed["cost_usd"], 6),
        "failures": failures,
    }


def _proxy_counters(results: list[GenerateBlockResult]) -> dict[str, int]:
    """Limiter traffic of the workers that reported (each worker's counters are cumulative)."""
    last: dict[str, dict[str, int]] = {}
    for r in results:
        if r.proxy:
            last[r.worker] = r.proxy
    out: dict[str, int] = {}
    for counters in last.values():
        for key, value in counters.items():
            out[key] = out.get(key, 0) + value
    return out
