"""The engine's public interface: ``Engine.complete(endpoint, request) -> Completion``.

Layers, outermost first, each knowing nothing of the ones above it::

    cache         engine.cache      identical request answered before -> free, no HTTP
    admission     engine.admission  concurrency cap, RPM/TPM buckets, pauses, server mirror
    retry         Engine._call      the one retry boundary (tenacity, full-jitter backoff)
    provider      engine.providers  build the body, decode the reply; one module per protocol

What each outcome does:

    2xx, usable body          -> Completion (cost = usage x price); cached; traced
    2xx, unusable body        -> retried like a 5xx, then ReplyError (the record fails)
    429                       -> back to admission (cut rate, honour Retry-After), not an attempt;
                                 bounded by MAX_RATE_LIMITED per call, then RequestError
    5xx, 408, reset, timeout  -> retried with exponential backoff and full jitter, at most
                                 EndpointConfig.max_attempts attempts, then RequestError
    400, 404, other 4xx       -> RequestError with the server's message (the record fails)
    401, 403                  -> AuthError (the run aborts; later calls fail at once)

Every attempt has a wall-clock deadline (``EndpointConfig.timeout_s``, an aiohttp
``ClientTimeout`` on the endpoint's session, so it costs nothing per request). API keys are read
from the environment when the engine opens, live only in the sessions' default headers, and are
masked out of every message that could carry them (``engine.providers.redact``).

The first attempt runs outside tenacity: its ``AsyncRetrying`` object costs ~35 us per call,
which is 15 % of a core at 5,000 calls/s; only a call that has already failed enters it.
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_random_exponential

from engine.admission import Admission
from engine.cache import ResponseCache, cache_key
from engine.config import EndpointConfig
from engine.errors import AuthError, ConfigError, ReplyError, RequestError
from engine.providers import Provider, error_message, make_provider, redact
from engine.trace import Trace, TraceEvent
from engine.types import ChatRequest, Completion, Usage

BACKOFF_BASE_S = 0.5  # first retry waits U(0, base), then U(0, 2 base), U(0, 4 base)...
BACKOFF_MAX_S = 20.0
MAX_RATE_LIMITED = 40  # 429s one call may receive before it gives up
EST_MAX_TOKENS = 256  # completion tokens assumed for admission when max_tokens is not set

_TRANSIENT_STATUS = frozenset({408, 500, 502, 503, 504, 520, 521, 522, 523, 524, 529})


class EndpointStats(msgspec.Struct):
    """Live counters of one endpoint (read by progress displays and written to the manifest)."""

    requests: int = 0  # complete() calls
    cache_hits: int = 0
    in_flight: int = 0  # HTTP calls sent and not yet answered
    ok: int = 0
    errors: int = 0  # complete() calls that failed for good
    http_429: int = 0
    retries: int = 0  # attempts after a failed one (5xx, reset, timeout, bad body)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    calls: int = 0  # HTTP calls sent, 429s and retries included
    timeouts: int = 0


class _Transient(Exception):
    """An attempt failed in a way worth retrying. Never leaves this module."""

    def __init__(self, message: str, status: int = 0, reply_error: bool = False):
        super().__init__(message)
        self.status = status
        self.reply_error = reply_error


class _Lane:
    """Everything about one endpoint at run time. Its repr never shows the session headers."""

    __slots__ = ("admission", "cfg", "key", "name", "price_in", "price_out", "provider", "session", "stats")

    def __init__(self, name: str, cfg: EndpointConfig):
        self.name = name
        self.cfg = cfg
        self.provider: Provider = make_provider(cfg)
        self.admission = Admission(cfg.concurrency, cfg.rpm, cfg.tpm)
        self.stats = EndpointStats()
        self.price_in = cfg.price_in / 1e6
        self.price_out = cfg.price_out / 1e6
        self.key: str | None = None
        self.session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"_Lane({self.name!r}, {self.provider!r})"


class Engine:
    """Chat completions over many endpoints, with cache, admission, retries and a trace.

    ``async with Engine(endpoints, cache_path=..., trace_dir=...) as engine:`` then
    ``await engine.complete("gpt", request)``. ``stats`` holds live ``EndpointStats``.
    """

    def __init__(
        self,
        endpoints: dict[str, EndpointConfig],
        *,
        cache_path: Path | None = None,
        trace_dir: Path | None = None,
        writer: str = "",
    ):
        self._lanes = {name: _Lane(name, cfg) for name, cfg in endpoints.items()}
        self.stats: dict[str, EndpointStats] = {name: lane.stats for name, lane in self._lanes.items()}
        self._cache_path = cache_path
        self._trace_dir = trace_dir
        self._writer = writer
        self.cache: ResponseCache | None = None
        self.trace: Trace | None = None
        self._aborted: AuthError | None = None

    def __repr__(self) -> str:
        return f"Engine(endpoints={list(self._lanes)})"

    # -- lifecycle --------------------------------------------------------------------------
    async def __aenter__(self) -> Engine:
        for lane in self._lanes.values():
            lane.key = lane.cfg.api_key()  # ConfigError (exit 2) when the env var is missing
        try:
            for lane in self._lanes.values():
                cfg = lane.cfg
                connector = aiohttp.TCPConnector(
                    limit=cfg.concurrency + 8, limit_per_host=0, ttl_dns_cache=300
                )
                headers = {**lane.provider.headers(lane.key), **cfg.headers}
                lane.session = aiohttp.ClientSession(
                    connector=connector,
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=cfg.timeout_s),
                    raise_for_status=False,
                )
            if self._cache_path is not None:
                self.cache = ResponseCache(self._cache_path)
            if self._trace_dir is not None:
                self.trace = Trace(self._trace_dir, self._writer)
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        for lane in self._lanes.values():
            if lane.session is not None:
                await lane.session.close()
                lane.session = None
        if self.cache is not None:
            await self.cache.flush()
            self.cache.close()
            self.cache = None
        if self.trace is not None:
            self.trace.close()
            self.trace = None

    # -- the call ---------------------------------------------------------------------------
    async def complete(self, endpoint: str, request: ChatRequest) -> Completion:
        """Answer one chat request: cache -> admission -> retry boundary -> provider.

        Raises ``RequestError`` (this record fails, the run goes on) or ``AuthError`` (abort).
        """
        lane = self._lanes.get(endpoint)
        if lane is None:
            raise ConfigError(f"unknown endpoint {endpoint!r}; known: {', '.join(self._lanes)}")
        if self._aborted is not None:
            raise self._aborted
        stats = lane.stats
        stats.requests += 1
        key = None
        if self.cache is not None:
            key = cache_key(lane.cfg.provider, lane.cfg.base_url, lane.cfg.model, request)
            hit = self.cache.get(key)
            if hit is not None:
                stats.cache_hits += 1
                hit.cached, hit.cost_usd, hit.latency_s, hit.attempts = True, 0.0, 0.0, 0
                if self.trace is not None:
                    self._trace(lane, hit, 0.0, 200, None)
                return hit
        if request.n > 1 and not lane.provider.supports_n:
            done = await self._fan_out(lane, request)
        else:
            done = await self._call(lane, request)
        if key is not None and self.cache is not None:
            self.cache.put(key, done)
        return done

    async def _fan_out(self, lane: _Lane, request: ChatRequest) -> Completion:
        """n separate calls for a protocol without ``n`` (Anthropic), merged into one."""
        one = msgspec.structs.replace(request, n=1)
        try:
            async with asyncio.TaskGroup() as tg:  # one failing cancels its siblings
                tasks = [tg.create_task(self._call(lane, one)) for _ in range(request.n)]
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

    async def _call(self, lane: _Lane, request: ChatRequest) -> Completion:
        """The retry boundary around one logical call; accounts, traces and maps errors."""
        body = lane.provider.encode(request)
        # tokens the server will count at admission: OpenAI's rule of thumb (chars/4, +3 per
        # message, +3 for the reply) plus the completion allowance; a high guess only costs pace
        est = (
            sum(len(m.content) for m in request.messages) / 4
            + 3 * len(request.messages)
            + 3
            + (request.max_tokens if request.max_tokens is not None else EST_MAX_TOKENS) * max(1, request.n)
        )
        state = [0, 0, 0]  # attempts (failed ones count), 429s received, last HTTP status
        t0 = time.monotonic()
        stats = lane.stats
        try:
            try:
                done = await self._attempt(lane, body, est, state)
            except _Transient:
                if lane.cfg.max_attempts <= 1:
                    raise
                await asyncio.sleep(random.uniform(0, BACKOFF_BASE_S))
                retrying = AsyncRetrying(
                    stop=stop_after_attempt(lane.cfg.max_attempts - 1),
                    wait=wait_random_exponential(multiplier=2 * BACKOFF_BASE_S, max=BACKOFF_MAX_S),
                    retry=retry_if_exception_type(_Transient),
                    reraise=True,
                )
                async for attempt in retrying:
                    with attempt:
                        stats.retries += 1
                        done = await self._attempt(lane, body, est, state)
        except _Transient as exc:
            stats.errors += 1
            err_cls = ReplyError if exc.reply_error else RequestError
            err = err_cls(
                f"endpoint {lane.name!r}: gave up after {state[0]} attempts: {exc}",
                status=exc.status or None,
                endpoint=lane.name,
            )
            self._trace_failure(lane, t0, state, err)
            raise err from None
        except RequestError as exc:  # AuthError is not a RequestError: it aborts below
            stats.errors += 1
            self._trace_failure(lane, t0, state, exc)
            raise
        except AuthError as exc:
            stats.errors += 1
            self._aborted = exc
            self._trace_failure(lane, t0, state, exc)
            raise
        latency = time.monotonic() - t0
        usage = done.usage
        done.latency_s = latency
        done.attempts = state[0]
        done.cost_usd = usage.prompt_tokens * lane.price_in + usage.completion_tokens * lane.price_out
        stats.ok += 1
        stats.prompt_tokens += usage.prompt_tokens
        stats.completion_tokens += usage.completion_tokens
        stats.cost_usd += done.cost_usd
        if self.trace is not None:
            self._trace(lane, done, latency, state[2], None, state[0], state[1])
        return done

    async def _attempt(self, lane: _Lane, body: bytes, est: float, state: list[int]) -> Completion:
        """One attempt: admission, send, classify. 429s loop back into admission in here."""
        admission = lane.admission
        stats = lane.stats
        session = lane.session
        if session is None:
            raise RuntimeError("Engine is not open: use `async with Engine(...) as engine`")
        state[0] += 1
        while True:
            lease = await admission.acquire(est)
            stats.calls += 1
            stats.in_flight += 1
            try:
                async with session.post(lane.provider.url, data=body) as resp:
                    status = resp.status
                    raw = await resp.read()
                    headers = lane.provider.limits(resp.headers)
            except TimeoutError:
                stats.in_flight -= 1
                stats.timeouts += 1
                admission.release(lease, 0)
                state[2] = 0
                raise _Transient(f"no reply within {lane.cfg.timeout_s:g}s") from None
            except aiohttp.ClientError as exc:
                stats.in_flight -= 1
                admission.release(lease, 0)
                state[2] = 0
                detail = redact(str(exc), lane.key)
                raise _Transient(
                    f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
                ) from None
            except BaseException:  # cancelled: give the slot back
                stats.in_flight -= 1
                admission.release(lease, 0)
                raise
            stats.in_flight -= 1
            state[2] = status
            if status < 300:
                try:
                    done = lane.provider.decode(raw)
                except ReplyError as exc:
                    admission.release(lease, status, headers)
                    raise _Transient(redact(str(exc), lane.key), status, reply_error=True) from None
                u = done.usage
                admission.release(lease, status, headers, u.prompt_tokens + u.completion_tokens)
                return done
            admission.release(lease, status, headers)
            if status == 429:
                stats.http_429 += 1
                state[1] += 1
                if state[1] >= MAX_RATE_LIMITED:
                    raise RequestError(
                        f"endpoint {lane.name!r}: still rate limited (429) after {state[1]} tries: "
                        f"{error_message(raw, lane.key)}",
                        status=429,
                        endpoint=lane.name,
                    )
                continue
            message = error_message(raw, lane.key)
            if status in (401, 403):
                raise AuthError(
                    f"endpoint {lane.name!r} ({lane.provider.url}) refused the credentials "
                    f"(HTTP {status}: {message}); check {lane.cfg.api_key_env or 'the API key'}"
                )
            if status in _TRANSIENT_STATUS or status >= 500:
                raise _Transient(f"HTTP {status}: {message}", status)
            raise RequestError(
                f"endpoint {lane.name!r}: HTTP {status}: {message}", status=status, endpoint=lane.name
            )

    # -- trace ------------------------------------------------------------------------------
    def _trace(
        self,
        lane: _Lane,
        done: Completion,
        latency: float,
        status: int,
        error: str | None,
        attempts: int = 0,
        http_429: int = 0,
    ) -> None:
        assert self.trace is not None
        u = done.usage
        self.trace.write(
            TraceEvent(
                ts=time.time(),
                endpoint=lane.name,
                model=lane.cfg.model,
                latency_s=round(latency, 6),
                prompt_tokens=u.prompt_tokens,
                completion_tokens=u.completion_tokens,
                cost_usd=done.cost_usd,
                attempts=attempts,
                http_429=http_429,
                cache_hit=done.cached,
                status=status,
                error=error,
            )
        )

    def _trace_failure(self, lane: _Lane, t0: float, state: list[int], exc: Exception) -> None:
        if self.trace is not None:
            self.trace.write(
                TraceEvent(
                    ts=time.time(),
                    endpoint=lane.name,
                    model=lane.cfg.model,
                    latency_s=round(time.monotonic() - t0, 6),
                    attempts=state[0],
                    http_429=state[1],
                    status=state[2],
                    error=type(exc).__name__,
                )
            )

    # -- introspection ----------------------------------------------------------------------
    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Plain-dict copy of the stats, plus each endpoint's current target rate (req/min)."""
        out = {}
        for name, lane in self._lanes.items():
            d = msgspec.to_builtins(lane.stats)
            d["rate_rpm"] = lane.admission.effective_rpm()
            out[name] = d
        return out
