"""The engine's public interface: ``Engine.complete(endpoint, request) -> Completion``.

Layers, outermost first, each in its own module and knowing nothing of the ones above it::

    cache         engine.request.cache      identical request answered before -> free, nothing sent;
                                    one in flight -> its answer is shared (single-flight)
    admission     engine.request.admission  concurrency cap, RPM/TPM buckets, pauses, server mirror
    retry         engine.request.retry      the one retry boundary (tenacity, full-jitter backoff)
    provider      engine.request.providers  build the body, decode the reply; one module per protocol
    executor      engine.request.executor   send the body, return (status, body, headers)

Each call is a ``Call`` record that emits events (``engine.request.events``); stats, trace, progress
and metrics are observers of them. What each outcome does:

    2xx, usable body          -> Completion (cost = usage x price); cached; traced
    2xx, unusable body        -> retried like a 5xx, then ReplyError (the record fails)
    429                       -> back to admission (cut rate, honour Retry-After), not an attempt;
                                 bounded by MAX_RATE_LIMITED per call, then RequestError
    5xx, 408, reset, timeout  -> retried with exponential backoff and full jitter, at most
                                 EndpointConfig.max_attempts attempts, then RequestError
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
from typing import Any, Protocol

import msgspec

from engine.config import EndpointConfig
from engine.errors import AuthError, ConfigError, ReplyError, RequestError
from engine.request.admission import Admission
from engine.request.cache import ResponseCache, cache_key
from engine.request.events import Call, Events, Observer
from engine.request.executor import BATCH_HEADER, Executor, HttpExecutor, SendError
from engine.request.providers import Provider, error_message, make_provider, redact, refused_credentials
from engine.request.retry import BACKOFF_BASE_S, BACKOFF_MAX_S, RetryPolicy, Transient, retrying
from engine.request.stats import EndpointStats, StatsObserver
from engine.request.trace import Trace, TraceObserver
from engine.types import ChatRequest, Completion, Usage

__all__ = ["BACKOFF_BASE_S", "BACKOFF_MAX_S", "MAX_RATE_LIMITED", "EndpointStats", "Engine", "Lane"]

MAX_RATE_LIMITED = 40  # 429s one call may receive before it gives up
EST_MAX_TOKENS = 256  # completion tokens assumed for admission when max_tokens is not set

_TRANSIENT_STATUS = frozenset({408, 500, 502, 503, 504, 520, 521, 522, 523, 524, 529})


class Admitter(Protocol):
    """What the engine needs of an admission (``engine.request.admission.Admission`` is the local one)."""

    async def acquire(self, est_tokens: float = 0.0) -> Any: ...

    def release(
        self,
        lease: Any,
        status: int,
        headers: Mapping[str, str] | None = None,
        used_tokens: float | None = None,
    ) -> None: ...

    def effective_rpm(self) -> float | None: ...


class Lane:
    """Everything about one endpoint at run time. Its repr never shows the key."""

    __slots__ = ("admission", "cfg", "key", "name", "policy", "price_in", "price_out", "provider")

    def __init__(self, name: str, cfg: EndpointConfig, admission: Admitter | None = None):
        self.name = name
        self.cfg = cfg
        self.provider: Provider = make_provider(cfg)
        if admission is None:
            admission = Admission(cfg.concurrency, cfg.rpm, cfg.tpm)
        self.admission: Admitter = admission
        # read here, not imported: tests shorten the backoff by patching this module
        self.policy = RetryPolicy(cfg.max_attempts, BACKOFF_BASE_S, BACKOFF_MAX_S)
        factor = cfg.batch.price_factor if cfg.mode == "batch" else 1.0  # Batch APIs bill less
        self.price_in = cfg.price_in / 1e6 * factor
        self.price_out = cfg.price_out / 1e6 * factor
        self.key: str | None = None

    def __repr__(self) -> str:
        return f"Lane({self.name!r}, {self.provider!r})"


def estimate_tokens(request: ChatRequest) -> float:
    """Tokens the server will count at admission: OpenAI's rule of thumb (chars/4, +3 per message,
    +3 for the reply) plus the completion allowance; a high guess only costs pace."""
    return (
        sum(len(m.content) for m in request.messages) / 4
        + 3 * len(request.messages)
        + 3
        + (request.max_tokens if request.max_tokens is not None else EST_MAX_TOKENS) * max(1, request.n)
    )


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
    ):
        admissions = admissions or {}
        unknown = set(admissions) - set(endpoints)
        if unknown:
            raise ConfigError(f"admissions for unknown endpoints: {', '.join(sorted(unknown))}")
        self._lanes = {name: Lane(name, cfg, admissions.get(name)) for name, cfg in endpoints.items()}
        self._stats = StatsObserver(list(self._lanes))
        self.stats: dict[str, EndpointStats] = self._stats.by_endpoint
        self.events = Events((self._stats, *observers))
        self.executor: Executor = executor if executor is not None else HttpExecutor()
        self._cache_path = cache_path
        self._trace_dir = trace_dir
        self._writer = writer
        self.cache: ResponseCache | None = None
        self.trace: Trace | None = None
        self._tracer: TraceObserver | None = None
        self._aborted: AuthError | None = None
        self._inflight: dict[bytes, asyncio.Future[Completion]] = {}  # cache key -> its first caller's
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
        for lane in self._lanes.values():
            lane.key = lane.cfg.api_key()  # ConfigError (exit 2) when the env var is missing
        try:
            await self.executor.open(self._lanes)
            self._open = True
            if self._cache_path is not None:
                self.cache = ResponseCache(self._cache_path)
            if self._trace_dir is not None:
                self.trace = Trace(self._trace_dir, self._writer)
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
    async def complete(self, endpoint: str, request: ChatRequest, stage: str = "") -> Completion:
        """Answer one chat request: cache -> admission -> retry boundary -> provider -> executor.
        ``stage`` labels the call in the trace (cost per stage in the report and the estimate).

        Raises ``RequestError`` (this record fails, the run goes on) or ``AuthError`` (abort).
        """
        lane = self._lanes.get(endpoint)
        if lane is None:
            raise ConfigError(f"unknown endpoint {endpoint!r}; known: {', '.join(self._lanes)}")
        if self._aborted is not None:
            raise self._aborted
        call = Call(lane.name, lane.cfg.model, estimate_tokens(request), stage)
        events = self.events
        for hook in events.requested:
            hook(call)
        key = cache_key(lane.cfg.provider, lane.cfg.base_url, lane.cfg.model, request)
        hit = await self._answered(key) if self.cache is not None else None
        if hit is not None:
            hit.cached, hit.cost_usd, hit.latency_s, hit.attempts = True, 0.0, 0.0, 0
            call.status = 200
            for hook in events.cached:
                hook(call, hit)
            return hit
        leader = asyncio.get_running_loop().create_future() if self.cache is not None else None
        if leader is not None:
            self._inflight[key] = leader
        try:
            if request.n > 1 and not lane.provider.supports_n:
                done = await self._fan_out(lane, request, key.hex(), stage)
            else:
                done = await self._call(lane, call, lane.provider.encode(request), key.hex())
        except BaseException as exc:
            if leader is not None:
                if isinstance(exc, Exception):
                    leader.set_exception(exc)
                    leader.exception()  # retrieved: followers try on their own
                else:
                    leader.cancel()
            raise
        finally:
            if leader is not None:
                del self._inflight[key]
        if leader is not None and self.cache is not None:
            self.cache.put(key, done)
            leader.set_result(done)
        return done

    async def _answered(self, key: bytes) -> Completion | None:
        """The cached answer, or that of the same request in flight (single-flight: identical
        concurrent calls share one send); None when this caller must send it."""
        assert self.cache is not None
        while (hit := self.cache.get(key)) is None and (leader := self._inflight.get(key)) is not None:
            try:
                return msgspec.structs.replace(await asyncio.shield(leader))
            except asyncio.CancelledError:
                if not leader.cancelled():
                    raise  # this caller was cancelled; if the first one was, look again
            except Exception:
                if self._aborted is not None:
                    raise self._aborted from None
                # it failed: look again (and send it ourselves, as before single-flight)
        return hit

    async def _fan_out(self, lane: Lane, request: ChatRequest, key: str, stage: str) -> Completion:
        """n separate calls for a protocol without ``n`` (Anthropic), merged into one; part i
        goes to the executor as ``KEY-i``."""
        one = msgspec.structs.replace(request, n=1)
        body, est = lane.provider.encode(one), estimate_tokens(one)
        try:
            async with asyncio.TaskGroup() as tg:  # one failing cancels its siblings
                tasks = [
                    tg.create_task(
                        self._call(lane, Call(lane.name, lane.cfg.model, est, stage), body, f"{key}-{i}")
                    )
                    for i in range(request.n)
                ]
        except BaseExceptionGroup as eg:
            auth = eg.subgroup(AuthError)
            raise (auth or eg).exceptions[0] from None
        parts = [t.result() for t in tasks]
        return Completion(
            choices=[c for p in parts for c in p.choices],
            usage=Usage(
                sum(p.usage.prompt_tokens for p in parts), sum(p.usage.completion_tokens for p in parts)
            ),
            model=parts[0].model,
            latency_s=max(p.latency_s for p in parts),
            attempts=sum(p.attempts for p in parts),
            cost_usd=sum(p.cost_usd for p in parts),
        )

    async def _call(self, lane: Lane, call: Call, body: bytes, key: str) -> Completion:
        """One logical call through the retry boundary; maps the way it ended to an error.
        ``key`` (the cache key in hex) names the request to the executor."""
        try:
            done = await retrying(lane.policy, self._attempt, lane, call, body, key, on_retry=self._retried)
        except Transient as exc:
            err_cls = ReplyError if exc.reply_error else RequestError
            error: Exception = err_cls(
                f"endpoint {lane.name!r}: gave up after {call.attempts} attempts: {exc}",
                status=exc.status or None,
                endpoint=lane.name,
            )
        except AuthError as exc:
            self._aborted = error = exc
        except RequestError as exc:
            error = exc
        else:
            u = done.usage
            done.latency_s = call.elapsed_s
            done.attempts = call.attempts
            done.cost_usd = u.prompt_tokens * lane.price_in + u.completion_tokens * lane.price_out
            for hook in self.events.completed:
                hook(call, done)
            return done
        for hook in self.events.failed:
            hook(call, error)
        raise error from None

    def _retried(self, lane: Lane, call: Call, body: bytes, key: str) -> None:
        for hook in self.events.retried:
            hook(call)

    async def _attempt(self, lane: Lane, call: Call, body: bytes, key: str) -> Completion:
        """One attempt: admission, send, classify. 429s loop back into admission in here; the
        lease is released and the exchange accounted in one place, the ``finally``."""
        admission = lane.admission
        events = self.events
        call.attempts += 1
        while True:
            lease = await admission.acquire(call.est_tokens)
            for hook in events.admitted:
                hook(call)
            call.status, call.timed_out = 0, False
            headers: Mapping[str, str] | None = None
            used: int | None = None
            for hook in events.sent:
                hook(call)
            try:
                status, raw, reply_headers = await self.executor.send(lane, body, key)
                call.status = status
                call.batch = reply_headers.get(BATCH_HEADER)
                headers = lane.provider.limits(reply_headers)
                if status < 300:
                    done = lane.provider.decode(raw)
                    used = done.usage.prompt_tokens + done.usage.completion_tokens
                    return done
                if status == 429:
                    call.http_429 += 1
                    for hook in events.throttled:
                        hook(call)
                    if call.http_429 >= MAX_RATE_LIMITED:
                        raise RequestError(
                            f"endpoint {lane.name!r}: still rate limited (429) after {call.http_429} "
                            f"tries: {error_message(raw, lane.key)}",
                            status=429,
                            endpoint=lane.name,
                        )
                    continue
                raise self._refusal(lane, status, raw)
            except SendError as exc:
                call.timed_out = exc.timeout
                raise Transient(redact(str(exc), lane.key)) from None
            except ReplyError as exc:
                raise Transient(redact(str(exc), lane.key), call.status, reply_error=True) from None
            finally:
                if used is None:
                    admission.release(lease, call.status, headers)
                else:
                    admission.release(lease, call.status, headers, used)
                for hook in events.answered:
                    hook(call)

    def _refusal(self, lane: Lane, status: int, raw: bytes) -> Exception:
        """The error for a non-2xx, non-429 reply."""
        message = error_message(raw, lane.key)
        if refused_credentials(status, raw):
            return AuthError(
                f"endpoint {lane.name!r} ({lane.provider.url}) refused the credentials "
                f"(HTTP {status}: {message}); check {lane.cfg.api_key_env or 'the API key'}"
            )
        if status in _TRANSIENT_STATUS or status >= 500:
            return Transient(f"HTTP {status}: {message}", status)
        return RequestError(
            f"endpoint {lane.name!r}: HTTP {status}: {message}", status=status, endpoint=lane.name
        )

    # -- introspection ----------------------------------------------------------------------
    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Plain-dict copy of the stats, plus each endpoint's current target rate (req/min)."""
        out = {}
        for name, lane in self._lanes.items():
            d = msgspec.to_builtins(self.stats[name])
            d["rate_rpm"] = lane.admission.effective_rpm()
            out[name] = d
        return out
