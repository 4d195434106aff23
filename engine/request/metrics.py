"""Prometheus metrics of a run: ``fair run`` / ``fair generate --metrics-port PORT`` serve ``/metrics``.

Per endpoint (label ``endpoint``)::

    fair_requests_total{outcome=ok|cached|failed}   complete() calls by how they ended
    fair_http_calls_total                           HTTP calls sent (429s and retries included)
    fair_http_429_total, fair_retries_total, fair_timeouts_total
    fair_in_flight                                  HTTP calls sent and not yet answered
    fair_effective_rpm, fair_effective_tpm          completed calls / tokens in the last minute
    fair_admission_rpm                              admission's current target rate (when it has one)
    fair_request_latency_seconds                    histogram of completed calls (retries included)
    fair_tokens_total{kind=prompt|completion}, fair_cost_usd_total

Per stage of a FAIR job: ``fair_stage_total{stage, outcome}`` (problems done / failed, student
attempts and mistakes, rationales accepted / rejected, feedback, samples).

Cheap by construction: the counters are the engine's ``EndpointStats``, read when Prometheus
scrapes; per call only the latency bucket and the one-minute ring are updated (``completed``).
The HTTP server is prometheus-client's, in a daemon thread, with a registry of its own per run.
A scrape is ``families(sample(...))``: the numbers as plain data first, so a ``--ray`` run serves
the very same families over its workers' samples, ``merge``d (``engine.scale.metrics``).
"""

from __future__ import annotations

import bisect
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from fairdistill.engine.errors import ConfigError
from fairdistill.engine.request.events import Call, Observer
from fairdistill.engine.request.stats import EndpointStats
from fairdistill.engine.types import Completion

if TYPE_CHECKING:
    from fairdistill.engine.request.client import Engine

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
WINDOW_S = 60

StageCounts = Callable[[], Mapping[tuple[str, str], float]]


class LatencyWindow:
    """Latency buckets and a one-minute ring of one endpoint."""

    __slots__ = ("buckets", "first", "ring_req", "ring_sec", "ring_tok", "sum")

    def __init__(self) -> None:
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.sum = 0.0
        self.ring_sec = [-1] * WINDOW_S
        self.ring_req = [0] * WINDOW_S
        self.ring_tok = [0] * WINDOW_S
        self.first: float | None = None

    def observe(self, latency: float, tokens: int, now: float) -> None:
        self.buckets[bisect.bisect_left(LATENCY_BUCKETS, latency)] += 1
        self.sum += latency
        sec = int(now)
        i = sec % WINDOW_S
        if self.ring_sec[i] != sec:
            self.ring_sec[i], self.ring_req[i], self.ring_tok[i] = sec, 0, 0
        self.ring_req[i] += 1
        self.ring_tok[i] += tokens
        if self.first is None:
            self.first = now

    def per_minute(self, now: float) -> tuple[float, float]:
        """Completed calls and tokens over the last minute (scaled up while younger than that)."""
        if self.first is None:
            return 0.0, 0.0
        sec = int(now)
        req = tok = 0
        for s, r, t in zip(self.ring_sec, self.ring_req, self.ring_tok, strict=True):
            if sec - s < WINDOW_S:
                req += r
                tok += t
        span = min(float(WINDOW_S), max(1.0, now - self.first))
        return req * 60.0 / span, tok * 60.0 / span


class Windows(Observer):
    """A ``LatencyWindow`` per endpoint, fed by the completed calls of one engine or several."""

    def __init__(self, names: Iterable[str]):
        self.by_endpoint = {name: LatencyWindow() for name in names}

    def completed(self, call: Call, done: Completion) -> None:
        u = done.usage
        self.by_endpoint[call.endpoint].observe(
            done.latency_s, u.prompt_tokens + u.completion_tokens, time.monotonic()
        )


# A sample: the numbers behind one scrape, plain (they cross processes: ``engine.scale.metrics``).
# {"endpoints": {name: {stats..., "buckets", "latency_sum", "rpm", "tpm", "admission_rpm"}},
#  "stages": {(stage, outcome): value} | None}
Sample = dict[str, Any]
COUNTERS = ("ok", "cache_hits", "errors", "calls", "http_429", "retries", "timeouts", "prompt_tokens",
            "completion_tokens", "reasoning_tokens", "cached_tokens", "cost_usd")  # fmt: skip


def sample(
    stats: Mapping[str, EndpointStats],
    windows: Windows,
    rates: Mapping[str, float | None],
    stages: Mapping[tuple[str, str], float] | None = None,
) -> Sample:
    """The numbers of one scrape: counters, gauges and latency per endpoint, stage counts."""
    now = time.monotonic()
    endpoints = {}
    for name, s in stats.items():
        win = windows.by_endpoint[name]
        rpm, tpm = win.per_minute(now)
        endpoints[name] = {
            **{k: getattr(s, k) for k in COUNTERS},
            "in_flight": s.in_flight,
            "buckets": list(win.buckets),
            "latency_sum": win.sum,
            "rpm": rpm,
            "tpm": tpm,
            "admission_rpm": rates.get(name),
        }
    return {"endpoints": endpoints, "stages": dict(stages) if stages is not None else None}


def merge(samples: Iterable[Sample], names: Iterable[str] = ()) -> Sample:
    """Samples of several processes as one: counters, gauges and buckets summed (the rates of
    workers add up), ``admission_rpm`` the highest; every endpoint of ``names`` has a row."""
    zero: dict[str, Any] = {**dict.fromkeys((*COUNTERS, "in_flight", "latency_sum", "rpm", "tpm"), 0),
            "buckets": [0] * (len(LATENCY_BUCKETS) + 1), "admission_rpm": None}  # fmt: skip
    endpoints: dict[str, dict[str, Any]] = {name: dict(zero, buckets=list(zero["buckets"])) for name in names}
    stages: dict[tuple[str, str], float] | None = None
    for smp in samples:
        for name, row in smp["endpoints"].items():
            acc = endpoints.setdefault(name, dict(zero, buckets=list(zero["buckets"])))
            for key, value in row.items():
                if key == "buckets":
                    acc[key] = [a + b for a, b in zip(acc[key], value, strict=True)]
                elif key == "admission_rpm":
                    acc[key] = max((v for v in (acc[key], value) if v is not None), default=None)
                else:
                    acc[key] += value
        if smp.get("stages") is not None:
            stages = stages if stages is not None else {}
            for key, value in smp["stages"].items():
                stages[key] = stages.get(key, 0) + value
    return {"endpoints": endpoints, "stages": stages}


def families(smp: Sample) -> Iterator[Metric]:
    """A sample as the metric families of ``/metrics`` (one process or a whole cluster alike)."""
    ep = ["endpoint"]
    requests = CounterMetricFamily("fair_requests", "complete() calls by outcome", labels=[*ep, "outcome"])
    calls = CounterMetricFamily("fair_http_calls", "HTTP calls sent", labels=ep)
    r429 = CounterMetricFamily("fair_http_429", "rate-limit (429) answers", labels=ep)
    retries = CounterMetricFamily("fair_retries", "attempts after a failed one", labels=ep)
    timeouts = CounterMetricFamily("fair_timeouts", "attempts past their deadline", labels=ep)
    in_flight = GaugeMetricFamily("fair_in_flight", "HTTP calls sent, not yet answered", labels=ep)
    rpm = GaugeMetricFamily("fair_effective_rpm", "completed calls in the last minute", labels=ep)
    tpm = GaugeMetricFamily("fair_effective_tpm", "tokens completed in the last minute", labels=ep)
    target = GaugeMetricFamily("fair_admission_rpm", "admission's current target rate", labels=ep)
    tokens = CounterMetricFamily("fair_tokens", "tokens of completed calls", labels=[*ep, "kind"])
    cost = CounterMetricFamily("fair_cost_usd", "dollars spent (usage x price)", labels=ep)
    latency = HistogramMetricFamily(
        "fair_request_latency_seconds", "latency of completed calls, retries included", labels=ep
    )
    for name, s in smp["endpoints"].items():
        requests.add_metric([name, "ok"], s["ok"])
        requests.add_metric([name, "cached"], s["cache_hits"])
        requests.add_metric([name, "failed"], s["errors"])
        calls.add_metric([name], s["calls"])
        r429.add_metric([name], s["http_429"])
        retries.add_metric([name], s["retries"])
        timeouts.add_metric([name], s["timeouts"])
        in_flight.add_metric([name], s["in_flight"])
        tokens.add_metric([name, "prompt"], s["prompt_tokens"])
        tokens.add_metric([name, "completion"], s["completion_tokens"])
        # parts of the two above: thinking (billed as output) and cache reads (prompt, cheaper)
        tokens.add_metric([name, "reasoning"], s.get("reasoning_tokens", 0))
        tokens.add_metric([name, "cached"], s.get("cached_tokens", 0))
        cost.add_metric([name], s["cost_usd"])
        rpm.add_metric([name], s["rpm"])
        tpm.add_metric([name], s["tpm"])
        if s["admission_rpm"] is not None:
            target.add_metric([name], s["admission_rpm"])
        cumulative, running = [], 0
        for le, n in zip((*LATENCY_BUCKETS, float("inf")), s["buckets"], strict=True):
            running += n
            cumulative.append(("+Inf" if le == float("inf") else repr(le), running))
        latency.add_metric([name], cumulative, s["latency_sum"])
    yield from (requests, calls, r429, retries, timeouts, in_flight, rpm, tpm, target, tokens, cost)
    yield latency
    if smp["stages"] is not None:
        stage = CounterMetricFamily(
            "fair_stage", "FAIR job records by stage and outcome", labels=["stage", "outcome"]
        )
        for (name, outcome), value in sorted(smp["stages"].items()):
            stage.add_metric([name, outcome], value)
        yield stage


class EngineMetrics:
    """An engine's metrics as a Prometheus collector (its ``Windows`` observe its request events)."""

    def __init__(self, engine: Engine, stages: StageCounts | None = None):
        self.engine = engine
        self.stages = stages
        self.windows = Windows(engine.stats)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        engine.observe(self.windows)

    def sample(self) -> Sample:
        rates = {name: lane.admission.effective_rpm() for name, lane in self.engine.lanes.items()}
        stages = self.stages() if self.stages is not None else None
        return sample(self.engine.stats, self.windows, rates, stages)

    def collect(self) -> Iterator[Metric]:  # runs in the metrics server's thread
        yield from families(self.sample())


class MetricsServer:
    """``/metrics`` of a registry on ``host:port`` (a daemon thread) until ``close()``."""

    def __init__(self, registry: CollectorRegistry, port: int, host: str = "127.0.0.1"):
        try:
            self._httpd, self._thread = start_http_server(port, addr=host, registry=registry)
        except OSError as exc:
            raise ConfigError(
                f"--metrics-port {port}: cannot listen on {host}:{port}: {exc.strerror}"
            ) from None
        self.port = self._httpd.server_port
        self.url = f"http://{host}:{self.port}/metrics"
        # say where (`--metrics-port 0` picks a free port: the only way to learn which)
        print(f"fair: serving Prometheus metrics on {self.url}", file=sys.stderr, flush=True)

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve_engine(engine: Engine, port: int | None, stages: StageCounts | None = None) -> MetricsServer | None:
    """Metrics of ``engine`` on ``port`` (None: none served). Close the server when the run ends."""
    if port is None:
        return None
    return MetricsServer(EngineMetrics(engine, stages).registry, port)
