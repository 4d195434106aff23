"""OpenAI's online wire on the simulator: ``POST /v1/chat/completions`` and ``GET /v1/models``.

A request goes through, in order: key (401; see ``keys``) -> parse -> model lookup (404) -> fault
burst "429" -> hidden limits, the key's, its organisation's, then the model's (429 with
``x-ratelimit-*`` and ``Retry-After``; a token bucket, or a fixed or sliding window, see
``limit_shape``; ``limit_headers = false`` hides them; a refused request takes from none) -> latency ->
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
from fairdistill.engine.sim.keys import KeyState, org_of
from fairdistill.engine.sim.limits import Quota, admit, fmt_duration
from fairdistill.engine.sim.replies import JSON, caller, openai_body
from fairdistill.engine.sim.strict import Refusal, Think, check_openai
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
        """``GET /v1/models`` (with ``[keys]``, only for a valid key)."""
        if self.core.keys.enabled and isinstance(
            key := caller(self.core.keys, None, request, False), web.Response
        ):
            return key
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
        """One chat call: its key checked, then the body and the model, then served."""
        core = self.core
        core.stats["requests"] += 1
        key = caller(core.keys, core.profile.api_key, request, anthropic=False)
        if isinstance(key, web.Response):
            core.stats["http_4xx"] += 1
            return key
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
        return await self._serve(request, key, model, body, req, think, t0)

    async def _serve(
        self,
        request: web.Request,
        key: KeyState | None,
        model: ModelState,
        body: dict,
        req: ChatCompletionRequest,
        think: Think,
        t0: float,
    ) -> web.StreamResponse:
        """An accepted call: admitted by the hidden limits (the key's, its organisation's, the
        model's), delayed, maybe spoiled by a fault, answered."""
        core = self.core
        n, max_tokens = req.n or 1, req.limit
        fault = core.draw_fault(model) if model.faulty else None
        if fault == "429":
            return self._too_many(model, model.quota, "requests", 1.0, t0, key)
        quotas = [*core.keys.quotas(key), *([model.quota] if model.limited else [])]
        limit_headers: dict[str, str] | None = None
        if quotas:
            admitted = self._admit(
                model, quotas, message_tokens(body["messages"]) + (max_tokens or 0) * n, t0, key
            )
            if isinstance(admitted, web.Response):
                return admitted
            limit_headers = admitted
        if (failed := await self._delay_or_fault(request, model, fault, t0, limit_headers)) is not None:
            return failed
        payload = core.completion(model, req.model, body, n, max_tokens, fault, think, org_of(key))
        if not max_tokens:  # reconcile: undeclared tokens count too
            for q in quotas:
                q.settle(payload["usage"]["completion_tokens"])
        core.keys.billed(key, payload["usage"])
        raw = self._spoil(orjson.dumps(openai_view(payload, model.profile)), fault, model.stats)
        core.stats["ok"] += 1
        model.stats["ok"] += 1
        core.keys.tally(key, "ok")
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

    def _admit(
        self, model: ModelState, quotas: list[Quota], declared: float, t0: float, key: KeyState | None
    ) -> web.Response | dict[str, str]:
        """The hidden limits in order: a 429 from the first one short (nothing taken from any),
        else one request taken from each -> the ``x-ratelimit-*`` headers of the reply (those
        of the first limit that shows them)."""
        now = time.monotonic()
        if (refused := admit(quotas, declared, now)) is not None:
            return self._too_many(model, *refused, t0, key)
        for q in quotas:
            if q.visible:
                return q.headers(now)
        return {}

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

    def _too_many(
        self, model: ModelState, quota: Quota, kind: str, wait: float, t0: float, key: KeyState | None
    ) -> web.Response:
        """The 429 of ``quota`` (a key's, an organisation's or the model's), counted."""
        self.core.stats["http_429"] += 1
        model.stats["http_429"] += 1
        self.core.keys.tally(key, "http_429")
        headers = quota.headers(time.monotonic())
        if quota.visible:
            headers["retry-after"] = str(max(1, math.ceil(wait)))
            headers["retry-after-ms"] = str(max(1, math.ceil(wait * 1000)))
        else:  # a gateway that hides its limits: the least a client can be told
            headers["retry-after"] = "1"
        where = "" if quota is model.quota else f" in {quota.name}"
        message = f"Rate limit reached for {model.name}{where} on {kind} per min. " + (
            f"Please try again in {fmt_duration(wait)}." if quota.visible else "Please try again later."
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
