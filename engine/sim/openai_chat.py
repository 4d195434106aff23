"""OpenAI's online wire on the simulator: ``POST /v1/chat/completions`` and ``GET /v1/models``.

A request goes through, in order: parse -> model lookup (404) -> fault burst "429" -> hidden
limits (429 with ``x-ratelimit-*`` and ``Retry-After``; a token bucket, or a fixed or sliding
window, see ``ModelProfile.limit_shape``; ``limit_headers = false`` hides them) -> latency ->
fault draw (5xx, hang, reset, malformed, truncated, empty, length) -> content. Every answered
request carries ``x-sim-latency-ms``: the time the server spent on it, so a client can tell its
own overhead from the server's.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter

import orjson
from aiohttp import web

from fairdistill.engine.sim.core import ModelState, SimCore
from fairdistill.engine.sim.limits import fmt_duration
from fairdistill.engine.sim.replies import JSON, openai_body
from fairdistill.engine.sim.strict import Refusal, check_openai
from fairdistill.engine.sim.usage import message_tokens, openai_view
from fairdistill.engine.wire import ChatCompletionRequest, RequestInvalid, parse_chat_request

_INVALID = "invalid_request_error"


class OpenAIChat:
    """The chat completions route over a ``SimCore``: hidden limits, faults, then content."""

    def __init__(self, core: SimCore):
        self.core = core

    def mount(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.list_models)

    async def list_models(self, request: web.Request) -> web.Response:
        data = [
            {"id": n, "object": "model", "created": 0, "owned_by": "fairdistill-sim"}
            for n in self.core.models
        ]
        return web.Response(body=orjson.dumps({"object": "list", "data": data}), content_type=JSON)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        self.core.in_flight += 1
        try:
            return await self.handle(request)
        finally:
            self.core.in_flight -= 1

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """One chat call: checked, admitted, delayed, maybe spoiled by a fault, answered."""
        core = self.core
        core.stats["requests"] += 1
        key = core.profile.api_key
        if key is not None and request.headers.get("Authorization") != f"Bearer {key}":
            return self.fail(401, "Incorrect API key provided.", _INVALID, "invalid_api_key")
        raw_body = await request.read()
        t0 = time.perf_counter()  # server time starts once the request is in: upload is the client's
        parsed = self._parse(raw_body)
        if isinstance(parsed, web.Response):
            return parsed
        body, req = parsed
        model = core.model(req.model)
        if model is None:
            return self.fail(404, f"The model `{req.model}` does not exist.", _INVALID, "model_not_found")
        model.stats["requests"] += 1
        try:
            think = check_openai(body, model.profile)
        except Refusal as exc:
            return self.fail(400, str(exc), _INVALID, exc.code, param=exc.param)
        n, max_tokens = req.n or 1, req.limit
        fault = core.draw_fault(model) if model.faulty else None
        limit_headers: dict[str, str] | None = None
        if fault == "429":
            return self._too_many(model, "requests", 1.0, t0)
        if model.limited:
            admitted = self._admit(model, message_tokens(body["messages"]) + (max_tokens or 0) * n, t0)
            if isinstance(admitted, web.Response):
                return admitted
            limit_headers = admitted
        if (failed := await self._delay_or_fault(request, model, fault, t0, limit_headers)) is not None:
            return failed
        payload = core.completion(model, req.model, body, n, max_tokens, fault, think)
        if model.tokens is not None and model.limited and not max_tokens:
            model.tokens.take(payload["usage"]["completion_tokens"])  # reconcile: undeclared tokens count too
        raw = self._spoil(orjson.dumps(openai_view(payload, model.profile)), fault, model.stats)
        core.stats["ok"] += 1
        model.stats["ok"] += 1
        ms = (time.perf_counter() - t0) * 1000
        core.latencies_ms.append(ms)
        headers = limit_headers if limit_headers is not None else {}
        headers["x-sim-latency-ms"] = f"{ms:.3f}"
        return web.Response(body=raw, content_type=JSON, headers=headers)

    def fail(
        self, status: int, message: str, kind: str, code: str | None = None, param: str | None = None
    ) -> web.Response:
        """An error reply, counted as a 4xx or a 5xx."""
        self.core.stats["http_4xx" if status < 500 else "http_5xx"] += 1
        return web.Response(status=status, body=openai_body(message, kind, code, param), content_type=JSON)

    def _parse(self, raw: bytes) -> web.Response | tuple[dict, ChatCompletionRequest]:
        """The body as plain objects (content reads them) and typed (validated), or the 400."""
        try:
            body = orjson.loads(raw)
            req = parse_chat_request(body)
        except orjson.JSONDecodeError as exc:
            return self.fail(400, f"request body is not valid JSON: {exc}", _INVALID)
        except RequestInvalid as exc:
            return self.fail(400, str(exc), _INVALID, param=exc.param)
        if req.model is None:
            return self.fail(400, "'model' is required", _INVALID, param="model")
        if req.stream:
            return self.fail(400, "the simulator does not stream", _INVALID, param="stream")
        return body, req

    async def _delay_or_fault(
        self,
        request: web.Request,
        model: ModelState,
        fault: str | None,
        t0: float,
        limit_headers: dict[str, str] | None,
    ) -> web.Response | None:
        """The latency (or a hang), then a 5xx or a reset where the fault says so (None: answer)."""
        stats, mstats, profile = self.core.stats, model.stats, model.profile
        delay = self.core.latency_s(profile)
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
            message = "The server had an error while processing your request."
            return web.Response(
                status=self.core.rng.choice((500, 502, 503)),
                body=openai_body(message, "server_error"),
                content_type=JSON,
                headers=_timing(t0, limit_headers),
            )
        if fault == "reset":
            stats["resets"] += 1
            mstats["resets"] += 1
            if request.transport is not None:
                request.transport.abort()
            raise asyncio.CancelledError  # nothing more to write: the connection is gone
        return None

    def _admit(self, model: ModelState, declared: float, t0: float) -> web.Response | dict[str, str]:
        """The hidden limits: a 429 when a bucket is short, else take from them -> the
        ``x-ratelimit-*`` headers of the reply."""
        now = time.monotonic()
        req_b, tok_b = model.requests, model.tokens
        if req_b is not None and (wait := req_b.wait_s(1.0, now)) > 0:
            return self._too_many(model, "requests", wait, t0)
        if tok_b is not None and (wait := tok_b.wait_s(declared, now)) > 0:
            return self._too_many(model, "tokens", wait, t0)
        if req_b is not None:
            req_b.take(1.0)
        if tok_b is not None:
            tok_b.take(declared)
        return model.limit_headers(now)

    def _spoil(self, raw: bytes, fault: str | None, mstats: Counter) -> bytes:
        """A faulty 200's body (malformed, truncated; empty and length were made upstream), counted."""
        if fault == "malformed":
            raw = b'{"id": "chatcmpl-sim", "choices": [{"message": <html>upstream error</html>'
        elif fault == "truncated":
            raw = raw[: len(raw) // 2]
        if fault in ("malformed", "truncated", "empty", "length"):
            self.core.stats[fault] += 1
            mstats[fault] += 1
        return raw

    def _too_many(self, model: ModelState, kind: str, wait: float, t0: float) -> web.Response:
        self.core.stats["http_429"] += 1
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
            body=openai_body(message, kind, "rate_limit_exceeded"),
            content_type=JSON,
            headers=_timing(t0, headers),
        )


def _timing(t0: float, headers: dict[str, str] | None) -> dict[str, str]:
    out = headers if headers is not None else {}
    out["x-sim-latency-ms"] = f"{(time.perf_counter() - t0) * 1000:.3f}"
    return out
