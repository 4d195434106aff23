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

Per key of an endpoint with a key pool (labels ``endpoint``, ``key``: the key's VARIABLE name,
never its value); none for a one-key endpoint::

    fair_key_requests_total{outcome=ok|failed}      calls that ended on that key
    fair_key_http_calls_total, fair_key_http_429_total
    fair_key_auth_refused_total                     401/403 answers (the key is then retired)
    fair_key_tokens_total{kind=prompt|cached|completion}, fair_key_cost_usd_total
    fair_key_effective_rpm                          completed calls on it in the last minute
    fair_key_admission_rpm                          its admission's current target rate (when known)
    fair_key_live                                   1 while the key is in use, 0 once retired
    fair_keys_live{endpoint}                        keys of the pool not retired

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
# per endpoint with a pool, per key variable: (its admission's target rate or None, live)
KeyStates = Mapping[str, Mapping[str, tuple[float | None, bool]]]


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
    """A ``LatencyWindow`` per endpoint, and per key of a pool, fed by the completed calls of one
    engine or several."""

    def __init__(self, names: Iterable[str]):
        self.by_endpoint = {name: LatencyWindow() for name in names}
        self.by_key: dict[tuple[str, str], LatencyWindow] = {}  # (endpoint, key variable)

    def completed(self, call: Call, done: Completion) -> None:
        u = done.usage
        tokens, now = u.prompt_tokens + u.completion_tokens, time.monotonic()
        self.by_endpoint[call.endpoint].observe(done.latency_s, tokens, now)
        if call.key_env is not None:
            win = self.by_key.get((call.endpoint, call.key_env))
            if win is None:
                win = self.by_key[(call.endpoint, call.key_env)] = LatencyWindow()
            win.observe(done.latency_s, tokens, now)


# A sample: the numbers behind one scrape, plain (they cross processes: ``engine.scale.metrics``).
# {"endpoints": {name: {stats..., "buckets", "latency_sum", "rpm", "tpm", "admission_rpm"}},
#  "stages": {(stage, outcome): value} | None}
Sample = dict[str, Any]
COUNTERS = ("ok", "cache_hits", "errors", "calls", "http_429", "retries", "timeouts", "prompt_tokens",
            "completion_tokens", "reasoning_tokens", "cached_tokens", "cost_usd")  # fmt: skip
# a pool key's row in a sample's ``endpoints[name]["keys"][env]``: KeyStats' counters, then
# "rpm" (completed in the last minute), "admission_rpm" (None: unknown) and "retired" (0 or 1)
KEY_COUNTERS = ("calls", "ok", "errors", "http_429", "refused", "prompt_tokens", "cached_tokens",
                "completion_tokens", "cost_usd")  # fmt: skip


def sample(
    stats: Mapping[str, EndpointStats],
    windows: Windows,
    rates: Mapping[str, float | None],
    stages: Mapping[tuple[str, str], float] | None = None,
    pools: KeyStates | None = None,
) -> Sample:
    """The numbers of one scrape: counters, gauges and latency per endpoint (and per key of a
    pool: ``pools`` gives each configured key's admission rate and state), stage counts."""
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
        pool = (pools or {}).get(name) or {}
        if s.keys or pool:
            endpoints[name]["keys"] = _key_rows(name, s, windows, pool, now)
    return {"endpoints": endpoints, "stages": dict(stages) if stages is not None else None}


def _key_rows(
    name: str, s: EndpointStats, windows: Windows, pool: Mapping[str, tuple[float | None, bool]], now: float
) -> dict[str, dict[str, Any]]:
    """A row per key of endpoint ``name``'s pool: those configured and those that served a call."""
    rows = {}
    for env in sorted({*pool, *s.keys}):
        ks = s.keys.get(env)
        win = windows.by_key.get((name, env))
        admission_rpm, live = pool.get(env, (None, True))
        rows[env] = {
            **{k: getattr(ks, k) if ks is not None else 0 for k in KEY_COUNTERS},
            "rpm": win.per_minute(now)[0] if win is not None else 0.0,
            "admission_rpm": admission_rpm,
            "retired": int(not live or (ks is not None and ks.retired)),
        }
    return rows


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
                if key == "keys":
                    _merge_keys(acc.setdefault("keys", {}), value)
                elif key == "buckets":
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


def zero_key_row() -> dict[str, Any]:
    """A pool key's row before any number: counters and rate 0, admission rate unknown, live."""
    return {**dict.fromkeys((*KEY_COUNTERS, "rpm", "retired"), 0), "admission_rpm": None}


def _merge_keys(acc: dict[str, dict[str, Any]], rows: Mapping[str, Mapping[str, Any]]) -> None:
    """Key rows of several processes: counters and rates summed, the highest admission rate,
    retired when any process saw the key refused (a pool's retirement holds for the run)."""
    for env, row in rows.items():
        mine = acc.setdefault(env, zero_key_row())
        for key, value in row.items():
            if key == "admission_rpm":
                mine[key] = max((v for v in (mine[key], value) if v is not None), default=None)
            elif key == "retired":
                mine[key] = max(mine[key], value)
            else:
                mine[key] += value


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
    if any(s.get("keys") for s in smp["endpoints"].values()):
        yield from key_families(smp)
    if smp["stages"] is not None:
        stage = CounterMetricFamily(
            "fair_stage", "FAIR job records by stage and outcome", labels=["stage", "outcome"]
        )
        for (name, outcome), value in sorted(smp["stages"].items()):
            stage.add_metric([name, outcome], value)
        yield stage


def key_families(smp: Sample) -> Iterator[Metric]:
    """The per-key series of the endpoints with a key pool (labelled by the key's variable)."""
    lk = ["endpoint", "key"]
    requests = CounterMetricFamily("fair_key_requests", "calls that ended on a key", labels=[*lk, "outcome"])
    calls = CounterMetricFamily("fair_key_http_calls", "HTTP calls sent with a key", labels=lk)
    r429 = CounterMetricFamily("fair_key_http_429", "rate-limit (429) answers to a key", labels=lk)
    refused = CounterMetricFamily("fair_key_auth_refused", "401/403 answers (the key is retired)", labels=lk)
    tokens = CounterMetricFamily("fair_key_tokens", "tokens completed on a key", labels=[*lk, "kind"])
    cost = CounterMetricFamily("fair_key_cost_usd", "dollars billed to a key", labels=lk)
    rpm = GaugeMetricFamily("fair_key_effective_rpm", "completed on a key in the last minute", labels=lk)
    target = GaugeMetricFamily("fair_key_admission_rpm", "a key's admission target rate", labels=lk)
    live = GaugeMetricFamily("fair_key_live", "1 while a key is in use, 0 once retired", labels=lk)
    pool = GaugeMetricFamily("fair_keys_live", "keys of the pool not retired", labels=["endpoint"])
    for name, s in smp["endpoints"].items():
        keys = s.get("keys") or {}
        if not keys:
            continue
        for env, k in keys.items():
            requests.add_metric([name, env, "ok"], k["ok"])
            requests.add_metric([name, env, "failed"], k["errors"])
            calls.add_metric([name, env], k["calls"])
            r429.add_metric([name, env], k["http_429"])
            refused.add_metric([name, env], k["refused"])
            for kind in ("prompt", "cached", "completion"):
                tokens.add_metric([name, env, kind], k[f"{kind}_tokens"])
            cost.add_metric([name, env], k["cost_usd"])
            rpm.add_metric([name, env], k["rpm"])
            if k["admission_rpm"] is not None:
                target.add_metric([name, env], k["admission_rpm"])
            live.add_metric([name, env], 0 if k["retired"] else 1)
        pool.add_metric([name], sum(not k["retired"] for k in keys.values()))
    yield from (requests, calls, r429, refused, tokens, cost, rpm, target, live, pool)


def key_states(lanes: Mapping[str, Any]) -> dict[str, dict[str, tuple[float | None, bool]]]:
    """Per endpoint with a key pool: each configured key's admission rate and whether it is live
    (from the pool when the lane's admission is one, else only the configured variables)."""
    out: dict[str, dict[str, tuple[float | None, bool]]] = {}
    for name, lane in lanes.items():
        if not lane.cfg.pooled:
            continue
        held = {k.env: k for k in getattr(lane.admission, "keys", ())}
        out[name] = {}
        for env in lane.cfg.key_envs():
            k = held.get(env)
            out[name][env] = (k.admission.effective_rpm(), k.live) if k is not None else (None, True)
    return out


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
        return sample(self.engine.stats, self.windows, rates, stages, key_states(self.engine.lanes))

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
