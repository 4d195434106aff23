"""A tiny programmable chat server for engine tests: real HTTP on 127.0.0.1, port 0.

    async with FakeServer() as srv:            # srv.url == "http://127.0.0.1:PORT/v1"
        srv.script = ["status:503", "status:503"]   # the next two requests answer 503
        srv.rule = lambda seen: "hang" if ... else None   # or decide per request
        srv.rpm = 600                          # a hidden token-bucket limit (OpenAI headers)

Actions (a string, or a tuple for ``status``):
    "ok"                      echo the last user message ("echo: <text>"), n choices
    "status:CODE"             an OpenAI-style error body with that status
    ("status", code, body, headers)  anything you like
    "hang"                    sleep past any client deadline
    "reset"                   close the connection without an answer
    "malformed"               200 with a body that is not JSON
    "empty"                   200 with ``choices: []``
    raw(body, status, headers)       exactly these bytes (any bytes: deep nesting, bad UTF-8,
                              control characters...) with that status and those headers

Every request is logged in ``srv.seen`` (monotonic time, path, headers, JSON body, status).
Speaks the OpenAI, Anthropic and Gemini shapes on their usual paths.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web
from aiohttp.test_utils import TestServer

from fairdistill.engine.rundir.store import iter_raw

Action = str | tuple


@dataclass
class Seen:
    t: float
    path: str
    headers: dict[str, str]
    body: Any
    status: int = 0


@dataclass
class FakeServer:
    latency_s: float = 0.0
    rpm: float | None = None  # hidden request limit (token bucket refilled continuously)
    burst_s: float = 60.0  # bucket capacity in seconds of refill
    limit_header: bool = True  # send x-ratelimit-limit-requests (OpenAI does)
    rate_headers: bool = True  # send x-ratelimit-remaining/reset-requests at all
    script: list[Action] = field(default_factory=list)
    rule: Callable[[Seen], Action | None] | None = None
    echo_auth: bool = False  # error bodies repeat the Authorization header (a careless server)
    seen: list[Seen] = field(default_factory=list)
    in_flight: int = 0  # requests being answered now
    peak_in_flight: int = 0  # the most at once

    async def __aenter__(self) -> FakeServer:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._openai)
        app.router.add_post("/v1/messages", self._anthropic)
        app.router.add_post("/v1/models/{tail}", self._gemini)
        self._server = TestServer(app, host="127.0.0.1")
        await self._server.start_server()
        self.url = f"http://127.0.0.1:{self._server.port}/v1"
        self._level = 0.0
        self._stamp = time.monotonic()
        self._bucket_ready = False
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._server.close()

    # -- helpers for tests ------------------------------------------------------------------
    def ok_times(self) -> list[float]:
        return [s.t for s in self.seen if s.status == 200]

    def count(self, status: int) -> int:
        return sum(1 for s in self.seen if s.status == status)

    # -- rate limit -------------------------------------------------------------------------
    def _limit(self, headers: dict[str, str], dialect: str = "openai") -> float | None:
        """Take one request from the bucket; the seconds to wait when it is empty. The headers
        are OpenAI's, or Anthropic's (``anthropic-ratelimit-*``, the reset an RFC 3339 time)."""
        if not self.rpm:
            return None
        rate = self.rpm / 60
        cap = max(1.0, rate * self.burst_s)
        now = time.monotonic()
        if not self._bucket_ready:
            self._level, self._stamp, self._bucket_ready = cap, now, True
        self._level = min(cap, self._level + (now - self._stamp) * rate)
        self._stamp = now
        wait = None
        if self._level < 1.0:
            wait = (1.0 - self._level) / rate
        else:
            self._level -= 1.0
        if self.rate_headers and dialect == "anthropic":
            reset = time.time() + (cap - self._level) / rate
            headers["anthropic-ratelimit-requests-limit"] = str(int(self.rpm))
            headers["anthropic-ratelimit-requests-remaining"] = str(max(0, int(self._level)))
            headers["anthropic-ratelimit-requests-reset"] = time.strftime(
                "%Y-%m-%dT%H:%M:%SZ", time.gmtime(math.ceil(reset))
            )
        elif self.rate_headers:
            if self.limit_header:
                headers["x-ratelimit-limit-requests"] = str(int(self.rpm))
            headers["x-ratelimit-remaining-requests"] = str(max(0, int(self._level)))
            headers["x-ratelimit-reset-requests"] = f"{max(0, round((cap - self._level) / rate * 1000))}ms"
        return wait

    # -- the request path -------------------------------------------------------------------
    async def _handle(self, request: web.Request, answer: Callable[[Any, str], bytes]) -> web.StreamResponse:
        """``_respond``, counting the requests in flight (``peak_in_flight``: the most at once)."""
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            return await self._respond(request, answer)
        finally:
            self.in_flight -= 1

    async def _respond(self, request: web.Request, answer: Callable[[Any, str], bytes]) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        seen = Seen(time.monotonic(), request.path, dict(request.headers), body)
        self.seen.append(seen)
        action: Action | None = self.script.pop(0) if self.script else None
        if action is None and self.rule is not None:
            action = self.rule(seen)
        action = action or "ok"
        headers: dict[str, str] = {}
        if action == "ok":
            wait = self._limit(headers, "anthropic" if request.path.endswith("/messages") else "openai")
            if wait is not None:
                headers["retry-after"] = str(max(1, math.ceil(wait)))
                headers["retry-after-ms"] = str(max(1, math.ceil(wait * 1000)))
                action = (
                    "status",
                    429,
                    {"error": {"message": "Rate limit reached", "type": "requests"}},
                    headers,
                )
        if self.latency_s and action != "hang" and not (isinstance(action, tuple) and action[1] == 429):
            await asyncio.sleep(self.latency_s)
        if isinstance(action, str) and action.startswith("status:"):
            code = int(action.split(":")[1])
            message = f"status {code} from the fake server"
            if self.echo_auth:
                message += (
                    f" (you sent {request.headers.get('Authorization') or request.headers.get('x-api-key')})"
                )
            action = ("status", code, {"error": {"message": message, "type": "fake"}}, {})
        if isinstance(action, tuple):
            _, code, err_body, extra = action
            seen.status = code
            data = err_body if isinstance(err_body, bytes) else orjson.dumps(err_body)
            all_headers = {**headers, **extra}
            if any(k.lower() == "content-type" for k in all_headers):
                return web.Response(status=code, body=data, headers=all_headers)
            return web.Response(status=code, body=data, headers=all_headers, content_type="application/json")
        if action == "hang":
            seen.status = -1
            await asyncio.sleep(3600)
        if action == "reset":
            seen.status = -2
            assert request.transport is not None
            request.transport.abort()
            raise asyncio.CancelledError
        seen.status = 200
        if action == "malformed":
            data = b'{"choices": [{"message": <html>upstream error</html>'
        elif action == "empty":
            data = b'{"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 0}}'
        else:
            last = next((m for m in reversed(body["messages"]) if m["role"] == "user"), body["messages"][-1])
            text = last["content"] if isinstance(last["content"], str) else last["content"][0]["text"]
            data = answer(body, f"echo: {text}")
        return web.Response(body=data, headers=headers, content_type="application/json")

    async def _openai(self, request: web.Request) -> web.StreamResponse:
        def answer(body: Any, text: str) -> bytes:
            n = body.get("n", 1)
            choices = [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": text if n == 1 else f"{text} #{i}"},
                    "finish_reason": "stop",
                }
                for i in range(n)
            ]
            usage = {"prompt_tokens": len(text) // 4 + 1, "completion_tokens": 3}
            return orjson.dumps({"id": "x", "model": body["model"], "choices": choices, "usage": usage})

        return await self._handle(request, answer)

    async def _anthropic(self, request: web.Request) -> web.StreamResponse:
        def answer(body: Any, text: str) -> bytes:
            return orjson.dumps(
                {
                    "type": "message",
                    "model": body["model"],
                    "content": [{"type": "text", "text": text}],
                    "stop_reason": "end_turn",
                    "usage": {"input_tokens": 7, "output_tokens": 3},
                }
            )

        return await self._handle(request, answer)

    async def _gemini(self, request: web.Request) -> web.StreamResponse:
        def answer(body: Any, text: str) -> bytes:
            n = body.get("generationConfig", {}).get("candidateCount", 1)
            return orjson.dumps(
                {
                    "candidates": [
                        {"content": {"role": "model", "parts": [{"text": text}]}, "finishReason": "STOP"}
                        for _ in range(n)
                    ],
                    "usageMetadata": {"promptTokenCount": 7, "candidatesTokenCount": 3},
                }
            )

        # adapt the Gemini request to the shape _handle reads (messages with role/content)
        return await self._handle(_GeminiView(request), answer)


class FakeServerThread:
    """A ``FakeServer`` on its own event loop in a daemon thread, for synchronous callers such
    as an in-process ``engine.cli.main`` (which runs ``asyncio.run`` itself)::

        with FakeServerThread() as srv:
            srv.rule = lambda seen: ...
            main(["generate", "--endpoint", srv.url, ...])
    """

    def __init__(self, **kwargs: Any):
        self.server = FakeServer(**kwargs)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fakeserver", daemon=True)

    def __enter__(self) -> FakeServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.server.__aenter__(), self._loop).result(10)
        return self.server

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.server.__aexit__(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


def raw(body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> tuple:
    """An action answering exactly ``body`` (any bytes) with ``status`` and ``headers``."""
    return ("status", status, body, headers or {})


class _GeminiView:
    """Presents a Gemini request body as ``messages`` so one handler serves every protocol."""

    def __init__(self, request: web.Request):
        self._request = request
        self.path = request.path
        self.headers = request.headers
        self.transport = request.transport

    async def read(self) -> bytes:
        body = orjson.loads(await self._request.read())
        body["messages"] = [{"role": c["role"], "content": c["parts"][0]["text"]} for c in body["contents"]]
        body["model"] = self.path.rsplit("/", 1)[-1].split(":")[0]
        return orjson.dumps(body)


# -- helpers for `fair generate` tests -----------------------------------------------------------


def write_input(path: Path, n: int, extra: list[bytes] = ()) -> Path:
    with open(path, "wb") as f:
        for i in range(n):
            if i % 2:
                f.write(orjson.dumps({"id": f"r{i}", "prompt": f"question {i}"}) + b"\n")
            else:
                msgs = [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": f"question {i}"},
                ]
                f.write(orjson.dumps({"id": f"r{i}", "messages": msgs}) + b"\n")
        for line in extra:
            f.write(line + b"\n")
    return path


def records(out: Path) -> dict[str, dict]:
    rows = list(iter_raw(out, "responses"))
    by_id = {r["id"]: r for r in rows}
    assert len(by_id) == len(rows), "duplicate records"
    return by_id


async def fair(*args: str, env: dict | None = None, kill_when=None) -> tuple[int, str, str]:
    """Run `python -m fairdistill ...` as a child; ``kill_when()`` true -> SIGKILL it."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fairdistill",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    if kill_when is not None:
        while proc.returncode is None and not kill_when():
            await asyncio.sleep(0.005)
        if proc.returncode is None:
            proc.send_signal(signal.SIGKILL)
    out, err = await proc.communicate()
    return proc.returncode, out.decode(), err.decode()


def gen_args(srv: FakeServer, inp: Path, out: Path, *extra: str) -> list[str]:
    return [
        "generate",
        "--endpoint",
        srv.url,
        "--model",
        "m",
        "--input",
        str(inp),
        "--output",
        str(out),
        "--no-progress",
        *extra,
    ]
