"""The simulator's HTTP replies in each provider's error shape, and the key check the OpenAI and
Anthropic wires share (Gemini's is in ``gemini``)."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

JSON = "application/json"


def json_reply(obj: Any, status: int = 200) -> web.Response:
    """``obj`` as a JSON response."""
    return web.Response(status=status, body=orjson.dumps(obj), content_type=JSON)


def openai_body(message: str, kind: str, code: str | None = None, param: str | None = None) -> bytes:
    """OpenAI's error body: ``{"error": {message, type, param, code}}``."""
    return orjson.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}})


def openai_error(status: int, message: str, kind: str) -> web.Response:
    return web.Response(status=status, body=openai_body(message, kind), content_type=JSON)


def anthropic_error(status: int, message: str, kind: str = "invalid_request_error") -> web.Response:
    return json_reply({"type": "error", "error": {"type": kind, "message": message}}, status)


def gemini_error(status: int, message: str, grpc_status: str, details: list | None = None) -> web.Response:
    """Google's error: ``{"error": {code, message, status[, details]}}``."""
    error: dict[str, Any] = {"code": status, "message": message, "status": grpc_status}
    if details:
        error["details"] = details
    return json_reply({"error": error}, status)


def key_refused(api_key: str | None, request: web.Request, anthropic: bool) -> web.Response | None:
    """The 401 of a request without the key (None: let it in). Anthropic takes ``x-api-key`` or,
    as its SDK 2.x sends, a Bearer token; OpenAI a Bearer token."""
    if api_key is None:
        return None
    if anthropic and request.headers.get("x-api-key") == api_key:
        return None
    if request.headers.get("Authorization") == f"Bearer {api_key}":
        return None
    message = "invalid x-api-key" if anthropic else "Incorrect API key provided."
    return openai_error(401, message, "authentication_error")
