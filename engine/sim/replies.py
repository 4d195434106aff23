"""The simulator's HTTP replies in each provider's error shape, and the key check the OpenAI and
Anthropic wires share (Gemini's is in ``gemini``): the profile's one ``api_key``
(``key_refused``), or its ``[keys]`` (``caller``: the ``KeyState`` of the key a request carries)."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from fairdistill.engine.sim.keys import KeyRing, KeyState

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
    if anthropic:
        return anthropic_error(401, "invalid x-api-key", "authentication_error")
    return web.Response(
        status=401,
        body=openai_body("Incorrect API key provided.", "invalid_request_error", "invalid_api_key"),
        content_type=JSON,
    )


def _bearer(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization", "")
    return auth[7:].strip() if auth[:7].lower() == "bearer " else None


def caller(
    keys: KeyRing, api_key: str | None, request: web.Request, anthropic: bool
) -> web.Response | KeyState | None:
    """Who sends ``request`` on the OpenAI or Anthropic wire: its key (None: the simulator has no
    ``[keys]`` and the single ``api_key``, if any, matched), or the provider's 401: OpenAI's
    ``invalid_api_key`` for an unknown or revoked key, Anthropic's ``authentication_error``."""
    if not keys.enabled:
        return key_refused(api_key, request, anthropic)
    given = request.headers.get("x-api-key") if anthropic else None
    found = keys.authenticate(given or _bearer(request))
    if not isinstance(found, str):
        return found
    if anthropic:
        missing = found == "missing"
        return anthropic_error(401, "x-api-key header is required" if missing else "invalid x-api-key",
                               "authentication_error")  # fmt: skip
    if found == "missing":
        message = "You didn't provide an API key. Send it in an Authorization header (Bearer auth)."
        return web.Response(status=401, body=openai_body(message, "invalid_request_error"), content_type=JSON)
    body = openai_body("Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
    return web.Response(status=401, body=body, content_type=JSON)
