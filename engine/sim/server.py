"""The simulator: an OpenAI-compatible chat server with hidden limits, faults and reasoning text.

Routes: ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health``, plus ``GET /stats``
(the counters as JSON) and ``POST /reset`` (zero the counters and refill every bucket) for
benchmarks that drive a simulator in another process.

A request goes through, in order: parse -> model lookup (404) -> fault burst "429" -> hidden
limits (429 with ``x-ratelimit-*`` and ``Retry-After``; a token bucket, or a fixed or sliding
window, see ``ModelProfile.limit_shape``; ``limit_headers = false`` hides them) -> latency ->
fault draw (5xx, hang, reset, malformed, truncated, empty, length) -> content. Every answered request carries
``x-sim-latency-ms``: the time the server spent on it, so a client can tell its own overhead
from the server's. Content is deterministic in (profile seed, request seed, model, messages,
choice index); with no seed it is deterministic at temperature 0 and random otherwise. Faults and
latency are drawn from one server-wide RNG (seeded from the profile), so a retried request can
succeed where the first attempt failed.
"""

from __future__ import annotations

import asyncio
import math
import random
import signal
import sys
import time
from collections import Counter, defaultdict, deque
from pathlib import Path

import orjson
from aiohttp import web

from engine.errors import ConfigError
from engine.rundir.schema import Problem
from engine.server_thread import ServerThread
from engine.sim.content import Reasoning, rng_for
from engine.sim.profiles import ModelProfile, SimProfile, load_profile
from engine.wire import RequestInvalid, parse_chat_request

JSON = "application/json"
_FAULTS = ("5xx", "hang", "reset", "malformed", "truncated", "empty", "length")


class SimStats(Counter):
    """Counters, readable as items or attributes (``stats.http_429``), plus the same per model in
    ``by_model``: ``requests``; ``ok`` (HTTP 200 sent, the faulty 200s below included);
    ``malformed``, ``truncated``, ``empty``, ``length`` (faulty 200s); ``http_429``; ``http_5xx``;
    ``http_4xx``; ``hangs`` and ``hangs_cancelled``; ``resets``. Missing counters read as 0."""

    def __init__(self) -> None:
        super().__init__()
        self.by_model: defaultdict[str, Counter] = defaultdict(Counter)

    def __getattr__(self, name: str) -> int:
        if name.startswith("_"):
            raise AttributeError(name)
        return self[name]

    def as_dict(self) -> dict:
        return {**self, "by_model": {k: dict(v) for k, v in self.by_model.items()}}

    def reset(self) -> None:
        self.clear()
        self.by_model.clear()


class Bucket:
    """A token bucket refilled continuously: ``per_minute`` units a minute, holding at most
    ``burst_s`` seconds' worth. This is how most providers enforce RPM/TPM; the level may go
    negative when a request used more tokens than it declared."""

    __slots__ = ("capacity", "level", "limit", "rate", "stamp")

    def __init__(self, per_minute: float, burst_s: float):
        self.limit = per_minute
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate * burst_s)
        self.level = self.capacity
        self.stamp = time.monotonic()

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait_s(self, amount: float, now: float) -> float:
        """Seconds until ``amount`` units are available (0 when they are now)."""
        self.refill(now)
        need = min(amount, self.capacity) - self.level
        return max(0.0, need / self.rate)

    def take(self, amount: float) -> None:
        self.level -= amount

    def remaining(self) -> float:
        return self.level

    def reset_s(self, now: float) -> float:
        """Seconds until the bucket is full again (``x-ratelimit-reset-*``)."""
        return max(0.0, (self.capacity - self.level) / self.rate)

    def headers(self, kind: str, into: dict[str, str], now: float) -> None:
        into[f"x-ratelimit-limit-{kind}"] = str(int(self.limit))
        into[f"x-ratelimit-remaining-{kind}"] = str(max(0, int(self.remaining())))
        into[f"x-ratelimit-reset-{kind}"] = fmt_duration(self.reset_s(now))


class Window(Bucket):
    """``per_minute`` units per ``window_s`` window of what was let through: *fixed* windows
    (back to back from ``start``, the whole budget back at each boundary) or a *sliding* one (the
    last ``window_s`` seconds, counted in bins of a hundredth of the window)."""

    __slots__ = ("bins", "sliding", "start", "used", "window")

    def __init__(self, per_minute: float, window_s: float, sliding: bool):
        self.limit = per_minute
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, per_minute * window_s / 60.0)
        self.window = window_s
        self.sliding = sliding
        self.start = time.monotonic()
        self.used = 0.0
        self.bins: deque[list[float]] = deque()  # sliding: [bin start, units]

    def refill(self, now: float) -> None:
        if self.sliding:
            while self.bins and self.bins[0][0] + self.window <= now:
                self.used -= self.bins.popleft()[1]
        elif now >= self.start + self.window:
            self.start = now - (now - self.start) % self.window
            self.used = 0.0

    def wait_s(self, amount: float, now: float) -> float:
        self.refill(now)
        need = min(amount, self.capacity)
        if self.used + need <= self.capacity:
            return 0.0
        if not self.sliding:
            return self.start + self.window - now
        freed = self.capacity - self.used
        for t, units in self.bins:  # the oldest bins leave first
            freed += units
            if freed >= need:
                return max(0.0, t + self.window - now)
        return self.window

    def take(self, amount: float) -> None:
        self.used += amount
        if self.sliding:
            now = time.monotonic()
            step = self.window / 100
            start = now - now % step
            if self.bins and self.bins[-1][0] == start:
                self.bins[-1][1] += amount
            else:
                self.bins.append([start, amount])

    def remaining(self) -> float:
        return self.capacity - self.used

    def reset_s(self, now: float) -> float:
        if not self.sliding:
            return max(0.0, self.start + self.window - now)
        return max(0.0, self.bins[-1][0] + self.window - now) if self.bins else 0.0


def make_limit(per_minute: float | None, p: ModelProfile) -> Bucket | None:
    """The hidden limit of ``per_minute`` units in the profile's shape (None: unlimited)."""
    if not per_minute:
        return None
    if p.limit_shape == "bucket":
        return Bucket(per_minute, p.limit_burst_s)
    return Window(per_minute, p.limit_window_s, sliding=p.limit_shape == "sliding_window")


def fmt_duration(seconds: float) -> str:
    """OpenAI's duration format: ``20ms``, ``1.2s``, ``6m0s``."""
    if seconds < 1.0:
        return f"{max(0, round(seconds * 1000))}ms"
    if seconds < 60.0:
        return f"{seconds:.2f}".rstrip("0").rstrip(".") + "s"
    minutes, rest = divmod(seconds, 60.0)
    return f"{int(minutes)}m{int(rest)}s"


class _Model:
    """Per-model live state: profile, buckets, counters."""

    __slots__ = ("faulty", "limited", "name", "profile", "requests", "stats", "tokens")

    def __init__(self, name: str, profile: ModelProfile, stats: Counter):
        self.name = name
        self.profile = profile
        self.stats = stats
        self.requests = make_limit(profile.rpm, profile)
        self.tokens = make_limit(profile.tpm, profile)
        self.limited = self.requests is not None or self.tokens is not None
        self.faulty = profile.faults.any()

    def reset(self) -> None:
        p = self.profile
        self.requests = make_limit(p.rpm, p)
        self.tokens = make_limit(p.tpm, p)

    def limit_headers(self, now: float) -> dict[str, str]:
        headers: dict[str, str] = {}
        if not self.profile.limit_headers:
            return headers
        if self.requests is not None:
            self.requests.headers("requests", headers, now)
        if self.tokens is not None:
            self.tokens.headers("tokens", headers, now)
        return headers


def _error_body(message: str, kind: str, code: str | None = None, param: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}})


def _prompt_tokens(messages: list) -> int:
    chars = 0
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        chars += len(content) if isinstance(content, str) else len(str(content or ""))
    return chars // 4 + 3 * len(messages) + 3


class SimServer:
    """One simulated provider. Use ``start_sim`` (async), ``SimThread`` (sync) or ``fair sim``."""

    def __init__(
        self,
        profile: SimProfile | str | Path = "default",
        problems: list[Problem] | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
    ):
        self.profile = profile if isinstance(profile, SimProfile) else load_profile(profile)
        self.host = host
        self.port = port
        self.stats = SimStats()
        self.started_at = time.monotonic()
        self._rng = random.Random(self.profile.seed)
        self._models = {
            name: _Model(name, mp, self.stats.by_model[name]) for name, mp in self.profile.models.items()
        }
        self._default = self._models.get(self.profile.default_model or "")
        self._serial = 0
        self.in_flight = 0  # requests being handled now (hangs included)
        self.latencies_ms: deque[float] = deque(maxlen=200_000)  # server-side time of recent 200 replies
        if problems is None and self.profile.dataset:
            problems = load_problems(self.profile.dataset)
        self.reasoning = Reasoning(problems)
        self.replay = None
        if any(mp.content == "replay" for mp in self.profile.models.values()):
            from engine.sim.replay import ReplayData

            self.replay = ReplayData.load(self.profile.replay_dir)
            for p in self.replay.problems(dataset=None):
                self.reasoning.add(p)
        self._runner: web.AppRunner | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024**2)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._list_models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/stats", self._stats)
        app.router.add_post("/reset", self._reset)
        from engine.sim.batch import mount  # files + batches, Anthropic /v1/messages(/batches)

        mount(self, app)
        return app

    async def start(self) -> SimServer:
        # handler_cancellation: a hung request is cancelled when its client goes away
        self._runner = web.AppRunner(self.app(), access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, backlog=4096, reuse_address=True)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.started_at = time.monotonic()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> SimServer:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    # -- routes ------------------------------------------------------------------------------

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(body=b'{"status":"ok"}', content_type=JSON)

    async def _stats(self, request: web.Request) -> web.Response:
        body = {**self.stats.as_dict(), "in_flight": self.in_flight}
        if request.query.get("latency"):
            body["server_latency_ms"] = self.latency_summary()
        return web.Response(body=orjson.dumps(body), content_type=JSON)

    def latency_summary(self) -> dict[str, float]:
        """Quantiles of the server-side time of recent 200 replies (what x-sim-latency-ms said)."""
        data = sorted(self.latencies_ms)
        if not data:
            return {}

        def q(p: float) -> float:
            return round(data[min(len(data) - 1, int(p * len(data)))], 3)

        return {"n": len(data), "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": round(data[-1], 3)}

    async def _reset(self, request: web.Request) -> web.Response:
        self.stats.reset()
        self.latencies_ms.clear()
        for m in self._models.values():
            m.stats = self.stats.by_model[m.name]
            m.reset()
        self.started_at = time.monotonic()
        return web.Response(body=b'{"status":"ok"}', content_type=JSON)

    async def _list_models(self, request: web.Request) -> web.Response:
        data = [
            {"id": n, "object": "model", "created": 0, "owned_by": "fairdistill-sim"} for n in self._models
        ]
        return web.Response(body=orjson.dumps({"object": "list", "data": data}), content_type=JSON)

    def _fail(
        self, status: int, message: str, kind: str, code: str | None = None, headers=None, param=None
    ) -> web.Response:
        self.stats["http_4xx" if status < 500 else "http_5xx"] += 1
        return web.Response(
            status=status, body=_error_body(message, kind, code, param), content_type=JSON, headers=headers
        )

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        self.in_flight += 1
        try:
            return await self._handle(request)
        finally:
            self.in_flight -= 1

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        stats = self.stats
        stats["requests"] += 1
        key = self.profile.api_key
        if key is not None and request.headers.get("Authorization") != f"Bearer {key}":
            return self._fail(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
        raw_body = await request.read()
        t0 = time.perf_counter()  # server time starts once the request is in: upload is the client's
        try:  # the typed request validates; content is read from the plain objects
            body = orjson.loads(raw_body)
            req = parse_chat_request(body)
        except orjson.JSONDecodeError as exc:
            return self._fail(400, f"request body is not valid JSON: {exc}", "invalid_request_error")
        except RequestInvalid as exc:
            return self._fail(400, str(exc), "invalid_request_error", param=exc.param)
        messages, name = body["messages"], req.model
        if name is None:
            return self._fail(400, "'model' is required", "invalid_request_error", param="model")
        if req.stream:
            return self._fail(400, "the simulator does not stream", "invalid_request_error", param="stream")
        model = self._models.get(name) or self._default
        if model is None:
            return self._fail(
                404, f"The model `{name}` does not exist.", "invalid_request_error", "model_not_found"
            )
        mstats = model.stats
        mstats["requests"] += 1
        profile = model.profile
        n = req.n or 1
        max_tokens = req.limit
        prompt_tokens = _prompt_tokens(messages)

        fault = self._draw_fault(model) if model.faulty else None
        limit_headers: dict[str, str] | None = None
        if fault == "429":
            return self._too_many(model, "requests", 1.0, t0)
        if model.limited:
            now = time.monotonic()
            declared = prompt_tokens + (max_tokens or 0) * n
            req_b, tok_b = model.requests, model.tokens
            if req_b is not None and (wait := req_b.wait_s(1.0, now)) > 0:
                return self._too_many(model, "requests", wait, t0)
            if tok_b is not None and (wait := tok_b.wait_s(declared, now)) > 0:
                return self._too_many(model, "tokens", wait, t0)
            if req_b is not None:
                req_b.take(1.0)
            if tok_b is not None:
                tok_b.take(declared)
            limit_headers = model.limit_headers(now)

        delay = self._latency_s(profile)
        if fault == "hang":
            stats["hangs"] += 1
            mstats["hangs"] += 1
            try:
                await asyncio.sleep(profile.faults.hang_s)
            except asyncio.CancelledError:  # the client went away (handler_cancellation)
                stats["hangs_cancelled"] += 1
                raise
            delay = 0.0
        if delay > 0:
            await asyncio.sleep(delay)
        if fault == "5xx":
            stats["http_5xx"] += 1
            mstats["http_5xx"] += 1
            status = self._rng.choice((500, 502, 503))
            return web.Response(
                status=status,
                body=_error_body("The server had an error while processing your request.", "server_error"),
                content_type=JSON,
                headers=self._timing(t0, limit_headers),
            )
        if fault == "reset":
            stats["resets"] += 1
            mstats["resets"] += 1
            if request.transport is not None:
                request.transport.abort()
            raise asyncio.CancelledError  # nothing more to write: the connection is gone

        choices, completion_tokens = self._choices(model, body, messages, n, max_tokens, fault)
        if tok_b_after := (model.tokens if model.limited and not max_tokens else None):
            tok_b_after.take(completion_tokens)  # reconcile: undeclared completion tokens count too
        self._serial += 1
        payload = {
            "id": f"chatcmpl-sim{self._serial}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": name,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
            "system_fingerprint": "fp_sim",
        }
        raw = orjson.dumps(payload)
        if fault == "malformed":
            raw = b'{"id": "chatcmpl-sim", "choices": [{"message": <html>upstream error</html>'
            stats["malformed"] += 1
            mstats["malformed"] += 1
        elif fault == "truncated":
            raw = raw[: len(raw) // 2]
            stats["truncated"] += 1
            mstats["truncated"] += 1
        elif fault in ("empty", "length"):
            stats[fault] += 1
            mstats[fault] += 1
        stats["ok"] += 1
        mstats["ok"] += 1
        ms = (time.perf_counter() - t0) * 1000
        self.latencies_ms.append(ms)
        headers = limit_headers if limit_headers is not None else {}
        headers["x-sim-latency-ms"] = f"{ms:.3f}"
        return web.Response(body=raw, content_type=JSON, headers=headers)

    # -- pieces --------------------------------------------------------------------------------

    def _timing(self, t0: float, headers: dict[str, str] | None) -> dict[str, str]:
        out = headers if headers is not None else {}
        out["x-sim-latency-ms"] = f"{(time.perf_counter() - t0) * 1000:.3f}"
        return out

    def _too_many(self, model: _Model, kind: str, wait: float, t0: float) -> web.Response:
        self.stats["http_429"] += 1
        model.stats["http_429"] += 1
        headers = model.limit_headers(time.monotonic())
        if model.profile.limit_headers:
            headers["retry-after"] = str(max(1, math.ceil(wait)))
            headers["retry-after-ms"] = str(max(1, math.ceil(wait * 1000)))
        else:  # a gateway that hides its limits: the least a client can be told
            headers["retry-after"] = "1"
        message = f"Rate limit reached for {model.name} on {kind} per min. " + (
            f"Please try again in {fmt_duration(wait)}."
            if model.profile.limit_headers
            else "Please try again later."
        )
        return web.Response(
            status=429,
            body=_error_body(message, kind, "rate_limit_exceeded"),
            content_type=JSON,
            headers=self._timing(t0, headers),
        )

    def _latency_s(self, p: ModelProfile) -> float:
        if p.latency_ms <= 0:
            return 0.0
        ms = p.latency_ms
        if p.latency_sigma > 0:
            ms = ms * math.exp(p.latency_sigma * self._rng.gauss(0.0, 1.0))
        return min(ms, p.latency_max_ms) / 1000.0

    def _draw_fault(self, model: _Model) -> str | None:
        f = model.profile.faults
        if f.bursts:
            t = time.monotonic() - self.started_at
            for b in f.bursts:
                if t >= b.offset_s and (t - b.offset_s) % b.every_s < b.duration_s:
                    return b.kind
        u = self._rng.random()
        for kind, p in zip(
            _FAULTS,
            (f.p_5xx, f.p_hang, f.p_reset, f.p_malformed, f.p_truncated, f.p_empty, f.p_length),
            strict=True,
        ):
            if u < p:
                return kind
            u -= p
        return None

    def _choices(
        self, model: _Model, body: dict, messages: list, n: int, max_tokens: int | None, fault: str | None
    ) -> tuple[list[dict], int]:
        if fault == "empty":
            return [], 0
        texts = self._texts(model, body, messages, n)
        choices = []
        completion = 0
        for i, text in enumerate(texts):
            finish = "stop"
            tokens = max(1, (len(text) + 3) // 4)
            if fault == "length":
                text, tokens, finish = text[: len(text) // 2], max(1, tokens // 2), "length"
            if max_tokens is not None and tokens > max_tokens:
                text, tokens, finish = text[: max_tokens * 4], max_tokens, "length"
            completion += tokens
            choices.append(
                {
                    "index": i,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": finish,
                    "logprobs": None,
                }
            )
        return choices, completion

    def _texts(self, model: _Model, body: dict, messages: list, n: int) -> list[str]:
        p = model.profile
        if p.content == "echo":
            last = messages[-1].get("content") if isinstance(messages[-1], dict) else ""
            text = "echo: " + (last if isinstance(last, str) else str(last))[: p.echo_chars]
            return [text] * n
        seed = body.get("seed")
        if seed is None:
            temperature = body.get("temperature", 1.0)
            seed = "t0" if temperature == 0 else f"r{self._rng.getrandbits(64)}"
        key = orjson.dumps(messages, option=orjson.OPT_SORT_KEYS)
        template = self.reasoning.prompts.identify(messages)
        out = []
        for i in range(n):
            rng = rng_for(self.profile.seed, seed, model.name, key, i)
            if p.content == "replay" and self.replay is not None:
                out.append(self.replay.reply(p, model.name, template, messages, rng, self.reasoning))
            else:
                out.append(self.reasoning.reply(p, messages, rng))
        return out


# -- ways to run it ------------------------------------------------------------------------------


def start_sim(
    profile: SimProfile | str | Path = "default",
    problems: list[Problem] | None = None,
    port: int = 0,
    host: str = "127.0.0.1",
) -> SimServer:
    """``async with start_sim(profile, problems) as sim:`` a simulator on ``sim.base_url``."""
    return SimServer(profile, problems, host=host, port=port)


class SimThread:
    """The simulator in a background thread with its own event loop, for synchronous code::

    with SimThread("committee", problems) as sim:
        run_something(sim.base_url)
    """

    def __init__(
        self,
        profile: SimProfile | str | Path = "default",
        problems: list[Problem] | None = None,
        port: int = 0,
        host: str = "127.0.0.1",
    ):
        self.server = SimServer(profile, problems, host=host, port=port)
        self._thread = ServerThread(self.server.start, self.server.stop, name="fair-sim", join_s=10)

    @property
    def base_url(self) -> str:
        return self.server.base_url

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def stats(self) -> SimStats:
        return self.server.stats

    def start(self) -> SimThread:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._thread.stop()

    def __enter__(self) -> SimThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def load_problems(dataset: str) -> list[Problem]:
    """Problems for reasoning content: a dataset name as in ``[dataset]``, optionally ``NAME:SPLIT``
    (``gsm8k``, ``svamp:train``, ``builtin``...). Reasoning models answer every split of a dataset
    a client may ask about, so the default split here is ``all`` where the dataset has one."""
    from engine.config import DatasetSection
    from engine.fair.datasets import load_problems as load

    name, _, split = dataset.partition(":")
    if split:
        return load(DatasetSection(name=name, split=split))
    try:
        return load(DatasetSection(name=name, split="all"))
    except ConfigError:
        return load(DatasetSection(name=name))


def cli_main(args) -> int:
    """``fair sim [--host H] [--port P] [--profile NAME|FILE.toml] [--dataset NAME]``."""
    profile = load_profile(args.profile)
    dataset = getattr(args, "dataset", None)
    problems = load_problems(dataset) if dataset else None
    reasoning = any(m.content != "echo" for m in profile.models.values())
    if problems is None and not profile.dataset and reasoning:
        try:  # reasoning models need problems to answer; the built-in set is always at hand
            problems = load_problems("builtin")
        except (ConfigError, OSError) as exc:
            print(
                f"fair sim: no --dataset and no built-in set ({exc}); unknown questions get a generic reply",
                file=sys.stderr,
            )
    server = SimServer(profile, problems, host=args.host, port=args.port)

    async def serve() -> None:
        await server.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        models = ", ".join(server.profile.models)
        known = len(server.reasoning.by_line)
        print(
            f"fair sim: profile {profile.name!r} ({models}; {known} known problems) on {server.base_url}",
            file=sys.stderr,
            flush=True,
        )
        await stop.wait()
        await server.stop()

    asyncio.run(serve())
    return 0
