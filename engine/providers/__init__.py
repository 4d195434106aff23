"""Wire protocols. One module per protocol, each a small transport-like object.

A provider only *translates*: it builds the URL, headers and body of one call from a
``ChatRequest`` and decodes a response body into a ``Completion``. It knows nothing about
retries, limits, caching or sessions (those live in ``engine.client`` and ``engine.admission``)::

    provider = make_provider(cfg)
    url, body = provider.url, provider.encode(request)
    headers = provider.headers(api_key)
    completion = provider.decode(raw_body)          # ReplyError when unusable
    limits = provider.limits(response_headers)      # rate-limit headers in OpenAI's x-ratelimit-*

Error bodies of every protocol are read by ``error_message``; messages pass through ``redact``
so an API key echoed by a server never reaches a log, a record or an exception.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Protocol

import msgspec

from engine.config import EndpointConfig
from engine.types import ChatRequest, Completion


class Provider(Protocol):
    name: str
    url: str
    supports_n: bool  # False: the client issues n separate calls and merges their choices

    def headers(self, api_key: str | None) -> dict[str, str]: ...

    def encode(self, request: ChatRequest) -> bytes: ...

    def decode(self, body: bytes) -> Completion: ...

    def limits(self, headers: Mapping[str, str]) -> Mapping[str, str]:
        """The response's rate-limit headers as OpenAI names them (``x-ratelimit-*``,
        ``retry-after``), which is what admission reads."""
        ...


def make_provider(cfg: EndpointConfig) -> Provider:
    """The provider object for an endpoint's ``provider`` field."""
    if cfg.provider == "openai":
        from engine.providers.openai import OpenAIProvider

        return OpenAIProvider(cfg.base_url, cfg.model)
    if cfg.provider == "anthropic":
        from engine.providers.anthropic import AnthropicProvider

        return AnthropicProvider(cfg.base_url, cfg.model)
    if cfg.provider == "gemini":
        from engine.providers.gemini import GeminiProvider

        return GeminiProvider(cfg.base_url, cfg.model)
    raise ValueError(f"unknown provider {cfg.provider!r}")


# -- error bodies ----------------------------------------------------------------------------


class _ErrorDetail(msgspec.Struct):
    message: str | None = None
    type: str | None = None
    status: str | None = None  # gemini: "INVALID_ARGUMENT"


class _ErrorBody(msgspec.Struct):
    """OpenAI ``{error: {message, type}}``, Anthropic ``{type: "error", error: {type, message}}``
    and Gemini ``{error: {code, message, status}}`` all share this view; some servers send
    ``{error: "text"}`` or ``{message: "text"}``."""

    error: _ErrorDetail | str | None = None
    message: str | None = None
    detail: str | None = None


_error_decoder = msgspec.json.Decoder(_ErrorBody)
_MAX_MESSAGE = 300


def error_message(body: bytes, api_key: str | None = None) -> str:
    """The server's own words for an error response, short and with any key masked."""
    text = ""
    try:
        err = _error_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        text = body[:_MAX_MESSAGE].decode("utf-8", "replace").strip()
    else:
        if isinstance(err.error, _ErrorDetail):
            text = err.error.message or err.error.type or err.error.status or ""
        elif isinstance(err.error, str):
            text = err.error
        text = text or err.message or err.detail or ""
    if len(text) > _MAX_MESSAGE:
        text = text[:_MAX_MESSAGE] + "..."
    return redact(text, api_key) if text else "(empty body)"


# Key shapes masked even when we do not hold the key (e.g. a server echoing another one):
# OpenAI/Anthropic "sk-...", Google "AIza...", and "Bearer <token>".
_KEY_SHAPES = re.compile(r"(sk-[A-Za-z0-9_\-]{4,}|AIza[0-9A-Za-z_\-]{10,}|(?<=Bearer )[^\s\"']{6,})")


def redact(text: str, api_key: str | None = None) -> str:
    """Mask ``api_key`` and anything shaped like an API key in ``text``."""
    if api_key and api_key in text:
        text = text.replace(api_key, "***")
    if api_key and len(api_key) >= 12:  # servers often echo a prefix or suffix of the key
        for part in (api_key[:10], api_key[-8:]):
            text = text.replace(part, "***")
    return _KEY_SHAPES.sub("***", text)


def normalise_finish(reason: str | None, table: dict[str, str]) -> str | None:
    """Map a protocol's stop reason onto OpenAI's vocabulary (stop, length, content_filter...)."""
    if reason is None:
        return None
    return table.get(reason, reason.lower())
