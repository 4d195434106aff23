"""The driver: plan the blocks, keep N worker actors busy, survive their deaths, merge the result.

Only the driver writes ``manifest.json``, ``config.toml`` and ``report.md``; workers write
records, traces, caches and their attempt manifests (``engine.scale.worker``). The loop:

* each worker has up to ``PER_WORKER`` blocks in flight (one waiting on its network while the
  other starts or ends);
* a block is handed out under a new epoch: ``blocks/<block>.fence`` is rewritten first, which
  fences off any earlier attempt still alive;
* a worker that dies (SIGKILL, OOM, node lost) is replaced, its leases are released in the
  limiter, and its blocks are queued again; a block whose attempts killed ``MAX_DEATHS``
  workers in a row stops the run (exit 1, naming it);
* an attempt that reports ``aborted`` (401/403, the breaker) stops everything: workers are
  killed, the manifest says ``aborted``, exit 3; ``config_error`` (a worker without the API
  key) the same with exit 2.

The input is streamed: ``fair generate`` reads a block's lines by byte offset when the block is
handed out; ``fair run`` reads the dataset once for the plan (ids only) and again as blocks are
handed out (``plan.ProblemBlocks``), holding only the blocks in flight. Progress is the
single-process display (``engine.progress.Progress``), advanced per finished block with that
block's request counters. ``run_s`` (what rates are measured over) excludes Ray's start-up and
shut-down, which the manifest reports apart (``ray_start_s``, ``ray_stop_s``).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import orjson

from fairdistill.engine.config import EndpointConfig
from fairdistill.engine.errors import AbortRun, ConfigError, FairError, one_line
from fairdistill.engine.progress import Progress
from fairdistill.engine.request.metrics import MetricsServer
from fairdistill.engine.rundir.store import atomic_write, recover_partial
from fairdistill.engine.rundir.verify import check_run_dir
from fairdistill.engine.scale import WORKER_CPUS, check_address, import_ray
from fairdistill.engine.scale.metrics import ClusterMetrics
from fairdistill.engine.scale.plan import Block, Plan
from fairdistill.engine.scale.results import BlockResult

R = TypeVar("R", bound=BlockResult)  # what a block attempt returns (RunBlockResult, GenerateBlockResult)

PER_WORKER = 2  # blocks in flight per worker
MAX_DEATHS = 3  # workers a block may kill in a row before the run stops
LOCAL_CPUS = max(2, os.cpu_count() or 2)  # what `--ray local` starts Ray with
PLACE_S = 120.0  # how long the workers may take to be placed before the run stops, saying so
COMPLETE = frozenset({"done", "done_with_failures"})


class Driver:
    """Ray, the limiter and the worker pool of one scaled run."""

    def __init__(
        self,
        run_dir: Path,
        address: str,
        workers: int,
        limits: Mapping[str, Any],
        endpoints: list[str],
        cap_usd: float | None = None,
    ):
        """``limits``: per endpoint its ``EndpointConfig`` (or ``(concurrency, rpm, tpm)``), whose
        admission (a ``KeyPool`` for ``keys``) the limiter actor holds for every worker."""
        self.run_dir = Path(run_dir)
        self.cap_usd = cap_usd  # run.max_cost_usd: a ledger in the limiter (engine.scale.budget)
        self.budget_stopped = False  # a block stopped at the cap: no new blocks
        self.address = check_address(address)
        self.n = workers
        self.limits = limits
        self.endpoints = endpoints
        # endpoint -> the size of its key pool (workers' proxies count the keys they saw retired)
        self.pools = {n: len(c.keys) for n, c in limits.items() if isinstance(c, EndpointConfig) and c.pooled}
        self.pid_dir = self.run_dir / "blocks" / "pids"
        self.ray: Any = None
        self.limiter: Any = None
        self.pool: list[Any] = []
        self.names: list[str] = []
        self.spawned = 0
        self.deaths: collections.Counter[str] = collections.Counter()
        self.killed_workers = 0
        self.ray_start_s = 0.0
        self.ray_stop_s = 0.0
        self.metrics = False  # workers keep request numbers for /metrics (engine.scale.metrics)
        if self.address == "local":  # known before Ray starts: say so at once
            self._check_room(LOCAL_CPUS, LOCAL_CPUS, "this machine (--ray local)")

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> Driver:
        ray = self.ray = import_ray()
        t0 = time.monotonic()
        kwargs: dict[str, Any] = {
            "include_dashboard": False,
            "logging_level": logging.ERROR,
            "log_to_driver": False,
        }
        if self.address == "local":
            ray.init(address="local", num_cpus=LOCAL_CPUS, **kwargs)
        else:
            _token_auth_like_ray_start()
            try:
                ray.init(address=self.address, **kwargs)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise ConfigError(
                    f"--ray {self.address}: cannot join the cluster: {one_line(str(exc), 200)}"
                ) from None
        if self.address != "local":
            total = float(ray.cluster_resources().get("CPU", 0))
            free = float(ray.available_resources().get("CPU", 0))
            self._check_room(total, free, f"the cluster at {self.address}")
        from fairdistill.engine.scale.limiter import Limiter, limiter_spec

        self.pid_dir.mkdir(parents=True, exist_ok=True)
        budget = (self.cap_usd, str(self.run_dir)) if self.cap_usd is not None else None
        specs = {
            n: limiter_spec(c, n) if isinstance(c, EndpointConfig) else c for n, c in self.limits.items()
        }
        self.limiter = Limiter.remote(specs, str(self.pid_dir), budget)
        for _ in range(self.n):
            self._spawn()
        try:
            ray.get([w.pid.remote() for w in self.pool] + [self.limiter.pid.remote()], timeout=PLACE_S)
        except ray.exceptions.GetTimeoutError:
            raise ConfigError(
                f"--workers {self.n}: the workers were not all placed within {PLACE_S:.0f} s (each asks "
                f"{WORKER_CPUS} CPU; the cluster has {ray.available_resources().get('CPU', 0):g} free); "
                "use fewer --workers"
            ) from None
        self.ray_start_s = time.monotonic() - t0
        return self

    def _check_room(self, total: float, free: float, where: str) -> None:
        """``ConfigError`` (exit 2) when ``--workers`` asks more CPUs than ``where`` has at all:
        Ray would wait for them forever, silently. (CPUs busy now but not for good: ``start``
        waits ``PLACE_S`` for the workers to be placed, then says so.)"""
        need = self.n * WORKER_CPUS
        if need > total + 1e-9:
            room = int(total / WORKER_CPUS + 1e-9)
            raise ConfigError(
                f"--workers {self.n}: each worker asks {WORKER_CPUS} CPU, {need:g} in all, but {where} "
                f"has {total:g} CPUs ({free:g} free now): room for {room} workers; use --workers "
                f"{max(1, room)} or fewer"
            )

    def _spawn(self, slot: int | None = None) -> None:
        from fairdistill.engine.scale.worker import BlockWorker

        name = f"w{self.spawned}"
        self.spawned += 1
        worker: Any = BlockWorker  # a ray.remote class: `.remote` is Ray's
        actor = worker.remote(name, self.limiter, self.endpoints, str(self.pid_dir), self.metrics, self.pools)
        if slot is None:
            self.pool.append(actor)
            self.names.append(name)
        else:
            self.pool[slot], self.names[slot] = actor, name

    def stop(self) -> None:
        if self.ray is None:
            return
        t0 = time.monotonic()
        self.tell_news()  # keys retired at the very end
        for actor in self.pool:
            with contextlib.suppress(Exception):
                self.ray.kill(actor)
        if self.limiter is not None:
            with contextlib.suppress(Exception):
                self.ray.kill(self.limiter, no_restart=True)
        self.ray.shutdown()
        self.ray = None
        self.ray_stop_s = time.monotonic() - t0

    # -- the loop ---------------------------------------------------------------------------
    def next_epoch(self, block: str) -> int:
        """Bump ``blocks/<block>.fence`` (a new inode: older attempts stop) and return the epoch."""
        path = self.run_dir / "blocks" / f"{block}.fence"
        try:
            epoch = int(path.read_text().split()[0]) + 1
        except (FileNotFoundError, ValueError, IndexError):
            epoch = 1
        atomic_write(path, f"{epoch}\n".encode())
        return epoch

    def run(
        self,
        blocks: list[Block],
        submit: Callable[[Any, Block, int], Any],
        done: Callable[[Block, R], None],
    ) -> list[R]:
        """Run ``blocks`` to completion; ``submit(actor, block, epoch)`` starts one attempt (a Ray
        ref to its ``BlockResult``); ``done(block, result)`` hears of each block that completed
        (progress, freeing its input)."""
        ray = self.ray
        pending = collections.deque(blocks)
        inflight: dict[Any, tuple[Block, int, Any]] = {}  # ref -> (block, slot, actor)
        load = [0] * self.n
        results: list[R] = []
        while pending or inflight:
            for slot in range(self.n):
                while pending and load[slot] < PER_WORKER and not self._isolated(slot, inflight):
                    if self.deaths[pending[0].id] and load[slot]:
                        break  # a block that was on a dead worker runs alone: the next death is its own
                    block = pending.popleft()
                    ref = submit(self.pool[slot], block, self.next_epoch(block.id))
                    inflight[ref] = (block, slot, self.pool[slot])
                    load[slot] += 1
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=1.0)
            self.tell_news()
            for ref in ready:
                block, slot, actor = inflight.pop(ref)
                if self.pool[slot] is actor:
                    load[slot] -= 1
                try:
                    res: R = ray.get(ref)
                except ray.exceptions.RayActorError:
                    self._dead(slot, actor, load)
                    self._retry(block, "its worker died", pending, inflight)
                    continue
                except ray.exceptions.RayTaskError as exc:
                    self._retry(block, one_line(str(exc.cause if exc.cause else exc), 300), pending, inflight)
                    continue
                status = res.status
                if status == "aborted":
                    raise Stop(AbortRun(f"block {block.id}: {res.error}"), [*results, res])
                if status == "config_error":
                    raise Stop(ConfigError(f"block {block.id}: {res.error}"), [*results, res])
                if status == "fenced":
                    continue
                if status == "budget":  # the cap: the blocks in flight finish, no new one starts
                    self.budget_stopped = True
                    pending.clear()
                    results.append(res)
                    continue
                self.deaths.pop(block.id, None)
                results.append(res)
                done(block, res)
        return results

    def tell_news(self) -> None:
        """Print the limiter's lines about pool keys retired since the last ask: each key once
        for the whole run (the workers, whose output Ray keeps, say nothing)."""
        if not self.pools or self.limiter is None:
            return
        with contextlib.suppress(Exception):  # a restarting limiter: its news come next time
            for line in self.ray.get(self.limiter.take_news.remote(), timeout=2):
                print(line, file=sys.stderr, flush=True)

    def _isolated(self, slot: int, inflight: dict) -> bool:
        """Whether ``slot`` runs a suspect block (one that was on a worker that died)."""
        return any(s == slot and self.deaths[b.id] for b, s, _ in inflight.values())

    def _dead(self, slot: int, actor: Any, load: list[int]) -> None:
        """A worker died: release its leases, replace it (once per death)."""
        if self.pool[slot] is not actor:
            return
        self.killed_workers += 1
        name = self.names[slot]
        with contextlib.suppress(Exception):  # a restarted limiter never knew its leases
            self.ray.get(self.limiter.forget.remote(name), timeout=30)
        self._spawn(slot)
        load[slot] = 0

    def _retry(self, block: Block, why: str, pending: collections.deque, inflight: dict) -> None:
        self.deaths[block.id] += 1
        if self.deaths[block.id] >= MAX_DEATHS:
            raise Stop(
                FairError(
                    f"block {block.id} (items {block.start}-{block.start + block.count - 1}) failed "
                    f"{MAX_DEATHS} attempts in a row ({why}); see {self.run_dir}/blocks"
                ),
                [],
            )
        pending.appendleft(block)


def _token_auth_like_ray_start() -> None:
    """``ray start`` (2.60) turns token auth on when ``~/.ray/auth_token`` exists, but a driver
    joining with ``ray.init(address=...)`` does not, and is refused; do what ``ray start`` does."""
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # another Ray version: its own rules apply
        return
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


class Stop(Exception):
    """Carries the error that ends the run out of ``Driver.run``."""

    def __init__(self, error: FairError, results: list[BlockResult]):
        super().__init__(str(error))
        self.error = error
        self.results = results


def attempt_endpoints(run_dir: Path) -> dict[str, dict[str, Any]]:
    """The endpoint counters of every attempt (all epochs: what was paid was paid), summed."""
    snaps = []
    for path in (Path(run_dir) / "blocks").glob("b*.e*.json"):
        try:
            snaps.append(orjson.loads(path.read_bytes()).get("endpoints") or {})
        except (orjson.JSONDecodeError, OSError, AttributeError):
            continue
    return merge_endpoints(snaps)


def attempt_snapshot(run_dir: Path, writer: str) -> dict[str, Any]:
    """One attempt's endpoint counters, summed over its endpoints (``{}`` if unreadable)."""
    try:
        snap = orjson.loads((Path(run_dir) / "blocks" / f"{writer}.json").read_bytes()).get("endpoints")
    except (orjson.JSONDecodeError, OSError, AttributeError):
        return {}
    summed: collections.Counter[str] = collections.Counter()
    for stats in (snap or {}).values():
        summed.update({k: v for k, v in stats.items() if isinstance(v, (int, float)) and v is not None})
    return dict(summed)


def done_blocks(run_dir: Path, ok: frozenset[str] = COMPLETE) -> set[str]:
    """Blocks with an attempt manifest of a complete status (skipped on a re-run)."""
    out = set()
    for path in (Path(run_dir) / "blocks").glob("b*.e*.json"):
        try:
            if orjson.loads(path.read_bytes()).get("status") in ok:
                out.add(path.name.split(".")[0])
        except (orjson.JSONDecodeError, OSError, AttributeError):
            continue
    return out


def seal_all(run_dir: Path, kinds: list[str]) -> None:
    """Seal every torn ``.partial`` shard (their writers are gone: finished, killed or fenced)."""
    for kind in [*kinds, "trace"]:
        folder = Path(run_dir) / kind
        if folder.is_dir():
            for path in folder.glob("shard-*.jsonl.partial"):
                recover_partial(path)


def merge_endpoints(snapshots: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Sum the attempts' endpoint counters (``rate_rpm``: the highest seen)."""
    out: dict[str, dict[str, Any]] = {}
    for snap in snapshots:
        for name, stats in (snap or {}).items():
            acc = out.setdefault(name, {})
            for key, value in stats.items():
                if key == "rate_rpm":
                    acc[key] = max((v for v in (acc.get(key), value) if v is not None), default=None)
                elif isinstance(value, (int, float)) and not isinstance(value, bool):
                    acc[key] = acc.get(key, 0) + value
    return out


def ray_fields(driver: Driver, plan: Plan, todo: int, run_s: float) -> dict[str, Any]:
    """The manifest's ``ray`` table: where, how many workers and blocks, how long."""
    return {
        "address": driver.address,
        "workers": driver.n,
        "blocks": len(plan.blocks),
        "blocks_run": todo,
        "block_size": plan.block_size,
        "ray_start_s": round(driver.ray_start_s, 3),
        "ray_stop_s": round(driver.ray_stop_s, 3),
        "run_s": round(run_s, 3),
        "workers_lost": driver.killed_workers,
    }


def close_metrics(metrics: tuple[MetricsServer, ClusterMetrics] | None) -> None:
    """Stop serving ``/metrics`` (before Ray stops: a scrape must not call into it then)."""
    if metrics is not None:
        metrics[1].close()
        metrics[0].close()


def refuse_single_process(out: Path) -> None:
    """A run directory a single process wrote has no block plan: its shards belong to no block.
    Then the rules of ``fair status`` (``engine.rundir.verify``): a newer schema, or a shard
    that the manifest or a done block's manifest lists missing or changed, is refused (exit 2,
    naming it; ``fair repair`` marks such a block to be redone, adopting what is left)."""
    check_run_dir(out)
    if (out / "manifest.json").exists() and not (out / "blocks" / "plan.json").exists():
        raise ConfigError(
            f"{out} was written by a single-process run (no blocks/plan.json): resume it without "
            "--ray, or use a new run directory with --ray"
        )


def count_calls(bar: Progress, stats: Mapping[str, Any]) -> None:
    """Add a finished block's request counters to the progress display."""
    bar.calls += int(stats.get("calls", 0))
    bar.cached_calls += int(stats.get("cache_hits", 0))
    bar.http_429 += int(stats.get("http_429", 0))
    bar.retries += int(stats.get("retries", 0))
    bar.tokens += int(stats.get("prompt_tokens", 0)) + int(stats.get("completion_tokens", 0))
    bar.cost_usd += float(stats.get("cost_usd", 0.0))
