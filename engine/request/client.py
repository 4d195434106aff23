"""The engine's public interface: ``Engine.complete(endpoint, request) -> Completion``.

Layers, outermost first, each in its own module and knowing nothing of the ones above it::

    cache         engine.request.cache      identical request answered before -> free, nothing sent;
                                    one in flight -> its answer is shared (single-flight)
    admission     engine.request.admission  concurrency cap, RPM/TPM buckets, pauses, server mirror
    retry         engine.request.retry      the one retry boundary (tenacity, full-jitter backoff)
    provider      engine.request.providers  build the body, decode the reply; one module per protocol
    executor      engine.request.executor   send the body to the lane's ``Target``, return
                                            (status, body, headers)

What a status means is one table, ``engine.request.providers.status``. One endpoint at run time
is a ``Lane`` (``engine.request.lane``: provider, prices, admission, the executor's target).
Each call is a ``Call`` record that emits events (``engine.request.events``); stats, trace, progress
and metrics are observers of them. What each outcome does:

    2xx, usable body          -> Completion (cost = usage x price); cached; traced
    2xx, unusable body        -> retried like a 5xx, then ReplyError (the record fails)
    429                       -> back to admission (cut rate, honour Retry-After), not an attempt;
                                 bounded by MAX_RATE_LIMITED per call, then RequestError
    5xx, 408, reset, timeout  -> retried with exponential backoff and full jitter, at most
                                 EndpointConfig.max_attempts attempts, then RequestError
    400 naming a parameter    -> the model does not take it (``providers.accepts.refused_param``):
                                 dropped for the endpoint (said once on stderr and in the trace)
                                 and the request sent again without it; not an attempt (a 400 is
                                 not billed), at most once per parameter
    400, 404, other 4xx       -> RequestError with the server's message (the record fails)
    401, 403                  -> AuthError (the run aborts; later calls fail at once)

Seams: ``Engine(..., admissions={name: ...}, executor=...)`` takes an endpoint's admission (a
shared limiter) and the executor (HTTP by default; a Batch API) from outside. API keys are read
from the environment when the engine opens, live only in the executor's sessions, and are
masked out of every message that could carry them (``engine.request.providers.redact``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec

from fairdistill.engine.config import EndpointConfig
from fairdistill.engine.errors import AuthError, ConfigError, RequestError
from fairdistill.engine.request.attempt import Sender
from fairdistill.engine.request.cache import ResponseCache, cache_key
from fairdistill.engine.request.events import Call, Events, Observer
from fairdistill.engine.request.executor import Executor, HttpExecutor
from fairdistill.engine.request.flight import SingleFlight
from fairdistill.engine.request.lane import Admitter, Lane, affinity_of, estimate_tokens, from_cache, merged
from fairdistill.engine.request.retry import BACKOFF_BASE_S, BACKOFF_MAX_S, RetryPolicy
from fairdistill.engine.request.stats import EndpointStats, StatsObserver
from fairdistill.engine.request.trace import Trace, TraceObserver
from fairdistill.engine.types import ChatRequest, Completion

__all__ = [
    "BACKOFF_BASE_S", "BACKOFF_MAX_S", "MAX_RATE_LIMITED", "Admitter", "EndpointStats", "Engine", "Lane",
]  # fmt: skip

MAX_RATE_LIMITED = 40  # 429s one call may receive before it gives up


class Engine:
    """Chat completions over many endpoints, with cache, admission, retries and a trace.

    ``async with Engine(endpoints, cache_path=..., trace_dir=...) as engine:`` then
    ``await engine.complete("gpt", request)``. ``stats`` holds live ``EndpointStats``;
    ``observe(observer)`` adds a listener of the request events.
    """

    def __init__(
        self,
        endpoints: dict[str, EndpointConfig],
        *,
        cache_path: Path | None = None,
        trace_dir: Path | None = None,
        writer: str = "",
        admissions: Mapping[str, Admitter] | None = None,
        executor: Executor | None = None,
        observers: tuple[Observer, ...] = (),
        compress: str = "none",
    ):
        admissions = admissions or {}
        self._compress = compress  # of the trace's sealed shards (``run.compress``)
        unknown = set(admissions) - set(endpoints)
        if unknown:
            raise ConfigError(f"admissions for unknown endpoints: {', '.join(sorted(unknown))}")
        # the backoff is read here, not imported: tests shorten it by patching this module
        self._lanes = {
            name: Lane(
                name, cfg, admissions.get(name), RetryPolicy(cfg.max_attempts, BACKOFF_BASE_S, BACKOFF_MAX_S)
            )
            for name, cfg in endpoints.items()
        }
        self._stats = StatsObserver(list(self._lanes))
        self.stats: dict[str, EndpointStats] = self._stats.by_endpoint
        self.events = Events((self._stats, *observers))
        self.executor: Executor = executor if executor is not None else HttpExecutor()
        self._cache_path, self._trace_dir, self._writer = cache_path, trace_dir, writer
        self.cache: ResponseCache | None = None
        self.trace: Trace | None = None
        self._tracer: TraceObserver | None = None
        self._sender = Sender(self.executor, self.events, MAX_RATE_LIMITED)
        self._flight = SingleFlight()
        self._open = False

    def __repr__(self) -> str:
        return f"Engine(endpoints={list(self._lanes)})"

    @property
    def lanes(self) -> Mapping[str, Lane]:
        return self._lanes

    def observe(self, observer: Observer) -> None:
        """Add a listener of the request events (stats, trace, progress, metrics...)."""
        self.events.add(observer)

    def unobserve(self, observer: Observer) -> None:
        self.events.remove(observer)

    # -- lifecycle --------------------------------------------------------------------------
    async def __aenter__(self) -> Engine:
        # ConfigError (exit 2): a key is missing. One target per endpoint, or per key of a pool.
        targets = {t.slot: t for lane in self._lanes.values() for t in lane.open()}
        try:
            await self.executor.open(targets)
            self._open = True
            if self._cache_path is not None:
                self.cache = ResponseCache(self._cache_path)
            if self._trace_dir is not None:
                self.trace = Trace(self._trace_dir, self._writer, self._compress)
                self._tracer = TraceObserver(self.trace)
                self.observe(self._tracer)
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._open:
            self._open = False
            await self.executor.close()
        if self.cache is not None:
            await self.cache.flush()
            self.cache.close()
            self.cache = None
        if self._tracer is not None:
            self.unobserve(self._tracer)
            self._tracer = None
        if self.trace is not None:
            self.trace.close()
            self.trace = None

    # -- the call ---------------------------------------------------------------------------
    async def complete(
        self, endpoint: str, request: ChatRequest, stage: str = "", affinity: str = ""
    ) -> Completion:
        """Answer one chat request: cache -> admission -> retry boundary -> provider -> executor.
        ``stage`` labels the call in the trace (cost per stage in the report and the estimate);
        ``affinity`` (a problem id) keeps related calls on one key of a pool (default: the prompt
        prefix), so the provider's prompt cache, which is per organisation, still hits.

        Raises ``RequestError`` (this record fails, the run goes on) or ``AuthError`` (abort).
        """
        lane = self._lanes.get(endpoint)
        if lane is None:
            raise ConfigError(f"unknown endpoint {endpoint!r}; known: {', '.join(self._lanes)}")
        if self._sender.aborted is not None:
            raise self._sender.aborted
        call = Call(lane.name, lane.cfg.model, estimate_tokens(request), stage)
        if lane.pooled:
            call.affinity = affinity_of(affinity, request)
        for hook in self.events.requested:
            hook(call)
        key = cache_key(lane.cfg.provider, lane.cfg.base_url, lane.cache_model, request)
        cache = self.cache
        if cache is None:
            return await self._send(lane, call, request, key.hex(), stage)
        if self._flight.busy(key):
            hit = await self._flight.follow(key, cache.get, lambda: self._sender.aborted)
        else:
            hit = cache.get(key)
        if hit is not None:
            return from_cache(self.events, call, hit)
        self._flight.lead(key)
        try:
            done = await self._send(lane, call, request, key.hex(), stage)
        except BaseException as exc:
            self._flight.end(key, exc)
            raise
        cache.put(key, done)
        self._flight.end(key, done)
        return done

    async def _send(self, lane: Lane, call: Call, request: ChatRequest, key: str, stage: str) -> Completion:
        """The call sent (not from the cache): one call, or n for a wire that refuses ``n``."""
        if request.n > 1 and not lane.provider.supports_n:
            return await self._fan_out(lane, request, key, stage)
        try:
            return await self._sender.call(lane, call, request, key)
        except RequestError:
            if request.n == 1 or lane.provider.supports_n:
                raise
            return await self._fan_out(lane, request, key, stage)  # `n` was refused

    async def _fan_out(self, lane: Lane, request: ChatRequest, key: str, stage: str) -> Completion:
        """n separate calls for a protocol without ``n`` (Anthropic), merged into one; part i
        goes to the executor as ``KEY-i``."""
        one = msgspec.structs.replace(request, n=1)
        est = estimate_tokens(one)
        pin = affinity_of("", one) if lane.pooled else 0
        try:
            async with asyncio.TaskGroup() as tg:  # one failing cancels its siblings
                tasks = [
                    tg.create_task(
                        self._sender.call(
                            lane, Call(lane.name, lane.cfg.model, est, stage, pin), one, f"{key}-{i}"
                        )
                    )
                    for i in range(request.n)
                ]
        except BaseExceptionGroup as eg:
            auth = eg.subgroup(AuthError)
            raise (auth or eg).exceptions[0] from None
        return merged([t.result() for t in tasks])

    # -- introspection ----------------------------------------------------------------------
    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Plain-dict copy of the stats, plus each endpoint's current target rate (req/min)."""
        out = {}
        for name, lane in self._lanes.items():
            d = msgspec.to_builtins(self.stats[name])
            d["rate_rpm"] = lane.admission.effective_rpm()
            out[name] = d
        return out
