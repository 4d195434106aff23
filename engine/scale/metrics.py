"""``--metrics-port`` with ``--ray``: the driver serves ``/metrics`` for the whole cluster run.

The metric names and labels are a single process's (``engine.request.metrics``), so dashboards
need no change; the values are the cluster's, with no ``worker`` label: counters and the latency
histogram summed over every worker that ever ran (a dead one's last numbers stay, so counters
never go backwards), ``fair_in_flight`` and the one-minute rates summed over the live workers,
``fair_admission_rpm`` the limiter actor's (the one ``Admission`` per endpoint). A few
``fair_ray_*`` series are added (workers, lost workers, stale snapshots, leases held). The
per-key series of a key pool (``fair_key_*``) likewise: counters summed, a key retired when any
worker saw it refused, its admission rate (and retirement) the limiter's when it reports them
(``admission_state()[endpoint]["keys"][variable] = {"rpm", "live"}``).

Pulled at scrape time, not pushed: each worker keeps its numbers from its engines' request
events (``WorkerMetrics``, an observer of every block's engine) and answers
``metrics_snapshot()`` with plain numbers; the collector asks every worker and the limiter at
once and waits at most ``PULL_TIMEOUT_S``, keeping the last snapshot of a worker that is slow or
dead. So a run nobody scrapes pays nothing (no timers or messages on the actors' event loops,
which carry the request path), and a scrape sees numbers as fresh as one round trip; the cost is
N small actor calls per scrape (Prometheus scrapes every 15 s or so).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from fairdistill.engine.request.metrics import (
    MetricsServer,
    Sample,
    Windows,
    families,
    merge,
    sample,
    zero_key_row,
)
from fairdistill.engine.request.stats import StatsObserver

PULL_TIMEOUT_S = 2.0  # a scrape waits this long for the workers' snapshots, then uses the last ones
GAUGES = ("in_flight", "rpm", "tpm")  # zero for a worker that is gone


class WorkerMetrics:
    """A worker's numbers over all its blocks: give ``observers`` to each block's engine, and
    ``add_job`` / ``end_job`` its FAIR jobs (stage counts)."""

    def __init__(self, endpoints: Iterable[str]):
        self.stats = StatsObserver(list(endpoints))
        self.windows = Windows(self.stats.by_endpoint)
        self.observers = (self.stats, self.windows)
        self.jobs: list[Callable[[], Mapping[tuple[str, str], float]]] = []  # live jobs' stage_counts
        self.stages_done: dict[tuple[str, str], float] | None = None  # of the jobs that ended

    def add_job(self, stage_counts: Callable[[], Mapping[tuple[str, str], float]]) -> None:
        self.jobs.append(stage_counts)
        if self.stages_done is None:
            self.stages_done = {}

    def end_job(self, stage_counts: Callable[[], Mapping[tuple[str, str], float]]) -> None:
        self.jobs.remove(stage_counts)
        done = self.stages_done if self.stages_done is not None else {}
        for key, value in stage_counts().items():
            done[key] = done.get(key, 0) + value
        self.stages_done = done

    def snapshot(self, rates: Mapping[str, float | None]) -> Sample:
        stages = None
        if self.stages_done is not None:
            stages = dict(self.stages_done)
            for counts in self.jobs:
                for key, value in counts().items():
                    stages[key] = stages.get(key, 0) + value
        return sample(self.stats.by_endpoint, self.windows, rates, stages)


class ClusterMetrics:
    """The Prometheus collector of a scaled run, in the driver (``engine.scale.driver.Driver``)."""

    def __init__(self, driver: Any, stages: bool, timeout_s: float = PULL_TIMEOUT_S):
        self.driver = driver
        self.stages = stages
        self.timeout_s = timeout_s
        self.last: dict[str, Sample] = {}  # worker name -> its latest snapshot (dead ones kept)
        self.limiter: dict[str, dict[str, Any]] = {}  # endpoint -> {"rpm", "leases"}
        self.stale = 0  # live workers whose snapshot did not come in time at the last scrape
        self.live: set[str] = set()
        self.closed = False
        self.lock = threading.Lock()  # one pull at a time; close() waits for it
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def pull(self) -> Sample:
        """Every live worker's snapshot and the limiter's state (``timeout_s`` at most), merged."""
        with self.lock:
            d = self.driver
            if not self.closed and d.ray is not None and d.limiter is not None:
                self._ask(d)
            smps = [smp if name in self.live else _gone(smp) for name, smp in self.last.items()]
            merged = merge(smps, d.endpoints)
            if self.stages and merged["stages"] is None:
                merged["stages"] = {}
            for ep, row in merged["endpoints"].items():
                if ep in self.limiter:
                    row["admission_rpm"] = self.limiter[ep]["rpm"]
                    _limiter_keys(row, self.limiter[ep].get("keys") or {})
            return merged

    def _ask(self, d: Any) -> None:
        ray = d.ray
        try:
            workers = list(zip(d.names, d.pool, strict=True))
            refs = {w.metrics_snapshot.remote(): name for name, w in workers}
            lim = d.limiter.admission_state.remote()
            ready, _ = ray.wait([*refs, lim], num_returns=len(refs) + 1, timeout=self.timeout_s)
        except Exception:  # shutting down: the last numbers stand
            return
        self.live = {name for name, _ in workers}
        got = set()
        for ref in ready:
            try:
                value = ray.get(ref, timeout=0)
            except Exception:  # a dead worker (or a restarting limiter): its last snapshot stays
                continue
            if ref is lim:
                self.limiter = value
            else:
                self.last[refs[ref]] = value
                got.add(refs[ref])
        self.stale = len(self.live - got)

    def close(self) -> None:
        """No more calls into Ray (the driver is about to stop it)."""
        with self.lock:
            self.closed = True

    def collect(self) -> Iterator[Metric]:  # runs in the metrics server's thread
        yield from families(self.pull())
        d = self.driver
        ep = ["endpoint"]
        workers = GaugeMetricFamily("fair_ray_workers", "worker actors alive")
        workers.add_metric([], len(self.live))
        lost = CounterMetricFamily("fair_ray_workers_lost", "worker actors that died and were replaced")
        lost.add_metric([], d.killed_workers)
        stale = GaugeMetricFamily("fair_ray_stale_workers", "workers whose numbers are from before")
        stale.add_metric([], self.stale)
        leases = GaugeMetricFamily("fair_ray_leases_held", "admission leases the limiter has lent", labels=ep)
        for name, state in sorted(self.limiter.items()):
            leases.add_metric([name], state["leases"])
        yield from (workers, lost, stale, leases)


def _gone(smp: Sample) -> Sample:
    """The snapshot of a worker that is gone: its gauges (and its keys' rates) zero."""
    endpoints = {}
    for ep, row in smp["endpoints"].items():
        row = {**row, **dict.fromkeys(GAUGES, 0)}
        if row.get("keys"):
            row["keys"] = {env: {**k, "rpm": 0.0} for env, k in row["keys"].items()}
        endpoints[ep] = row
    return {**smp, "endpoints": endpoints}


def _limiter_keys(row: dict[str, Any], keys: Mapping[str, Mapping[str, Any]]) -> None:
    """The limiter's word on an endpoint's pool keys: each one's admission rate, and retired."""
    rows = row.setdefault("keys", {})
    for env, state in keys.items():
        k = rows.setdefault(env, zero_key_row())
        k["admission_rpm"] = state.get("rpm")
        if state.get("live") is False:
            k["retired"] = 1
    if not rows:
        del row["keys"]


def serve_cluster(driver: Any, port: int | None, stages: bool) -> tuple[MetricsServer, ClusterMetrics] | None:
    """``/metrics`` of ``driver``'s run on ``port`` (None: none). Bound before Ray starts, so a
    busy port is exit 2 at once; close the collector, then the server, before ``driver.stop()``."""
    if port is None:
        return None
    driver.metrics = True
    collector = ClusterMetrics(driver, stages)
    return MetricsServer(collector.registry, port), collector
