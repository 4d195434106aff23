"""Wire protocols. One module per protocol, each a small transport-like object.

A provider only *translates*: it builds the URL, headers and body of one call from a
``ChatRequest`` and decodes a response body into a ``Completion``. It knows nothing about
retries, limits, caching or sessions (those live in ``engine.request.client`` and
``engine.request.admission``)::

    provider = make_provider(cfg)
    url, body = provider.url, provider.encode(request)
    headers = provider.headers(api_key)
    completion = provider.decode(raw_body)          # ReplyError when unusable
    limits = provider.limits(response_headers)      # rate-limit headers in OpenAI's x-ratelimit-*

Everything a server sends is untrusted. ``decode`` turns any body that is not a usable reply
(bad JSON, deep nesting, wrong types, token counts out of range, a choice with no text) into a
``ReplyError``, which the client retries and then records as a failure. ``limits`` passes the
rate-limit headers through ``sane_limits``: every duration is clamped to
``[0, max_wait_s]`` and counts to finite, non-negative numbers. Error bodies of every protocol
are read by ``error_message``: control characters escaped, cut short, and passed through
``redact`` so an API key echoed by a server never reaches a log, a record or an exception.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Annotated, Protocol

import msgspec

from engine.config import EndpointConfig
from engine.errors import ReplyError, one_line
from engine.request.admission import parse_duration, parse_retry_after
from engine.types import ChatRequest, Completion

# Shared by the decoders: a token count is a non-negative int below 2**40 (no real reply comes
# near; a usage beyond 64 bits would otherwise reach the cost sums and the manifest), and a stop
# reason is a short word.
TokenCount = Annotated[int, msgspec.Meta(ge=0, le=2**40)]
FinishReason = Annotated[str, msgspec.Meta(max_length=64)]
MAX_CHOICES = 128  # n is at most 128 (engine.config.Choices)
MAX_WAIT_S = 600.0  # default ceiling of a server-given pause (EndpointConfig.max_wait_s)


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
        from engine.request.providers.openai import OpenAIProvider

        return OpenAIProvider(cfg.base_url, cfg.model, cfg.max_wait_s)
    if cfg.provider == "anthropic":
        from engine.request.providers.anthropic import AnthropicProvider

        return AnthropicProvider(cfg.base_url, cfg.model, cfg.max_wait_s)
    if cfg.provider == "gemini":
        from engine.request.providers.gemini import GeminiProvider

        return GeminiProvider(cfg.base_url, cfg.model, cfg.max_wait_s)
    raise ValueError(f"unknown provider {cfg.provider!r}")


def decode_reply(decoder: msgspec.json.Decoder, body: bytes, url: str):
    """``decoder.decode(body)``, with every way a body can be unusable as a ``ReplyError``."""
    try:
        return decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ReplyError(f"unusable reply from {url}: {one_line(str(exc), 200)}") from None
    except RecursionError:
        raise ReplyError(f"unusable reply from {url}: JSON nested too deeply") from None


# -- rate-limit headers -----------------------------------------------------------------------

_DURATIONS = ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens")
_COUNTS = (
    "x-ratelimit-remaining-requests",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-limit-requests",
    "x-ratelimit-limit-tokens",
)
MAX_COUNT = 1e12


def sane_limits(headers: Mapping[str, str], max_wait_s: float = MAX_WAIT_S) -> dict[str, str]:
    """The rate-limit headers admission reads, made safe: durations (``Retry-After`` in seconds or
    as an HTTP date, ``retry-after-ms``, ``x-ratelimit-reset-*``) clamped to ``[0, max_wait_s]``
    (``inf`` and huge values to the ceiling, negatives to 0), counts finite and within
    ``[0, 1e12]`` (a limit at least 1). An unreadable value (``nan``, text) is dropped, as if the
    server had not sent it, and so is a ``remaining`` count with neither its reset nor its limit."""
    out: dict[str, str] = {}
    for key in _DURATIONS:
        if (value := _seconds(headers.get(key), parse_duration)) is not None:
            out[key] = f"{min(value, max_wait_s):.3f}"
    if (value := _seconds(headers.get("retry-after"), parse_retry_after)) is not None:
        out["retry-after"] = f"{min(value, max_wait_s):.3f}"
    if (ms := _float(headers.get("retry-after-ms"))) is not None:
        out["retry-after-ms"] = f"{min(max(ms, 0.0), max_wait_s * 1000):.3f}"
    for key in _COUNTS:
        if (n := _float(headers.get(key))) is not None and n >= (1 if "-limit-" in key else 0):
            out[key] = f"{min(n, MAX_COUNT):g}"
    for kind in ("requests", "tokens"):  # a count with neither its reset nor its limit gives no rate:
        if f"x-ratelimit-reset-{kind}" not in out and f"x-ratelimit-limit-{kind}" not in out:
            out.pop(f"x-ratelimit-remaining-{kind}", None)  # "0 left" alone would stall the endpoint
    return out


def _seconds(value: str | None, parse) -> float | None:
    if value is None or "nan" in value.lower():  # NaN: unreadable (a plain float() would give 0)
        return None
    try:
        seconds = parse(value.strip())
    except (ValueError, TypeError, IndexError, OverflowError):
        return None
    if seconds is None or math.isnan(seconds):
        return None
    return max(0.0, seconds)


def _float(value: str | None) -> float | None:
    try:
        n = float(value) if value is not None else None
    except (ValueError, OverflowError):
        return None
    return None if n is None or math.isnan(n) else n


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


def refused_credentials(status: int, body: bytes) -> bool:
    """401/403, or Google's 400 ``API_KEY_INVALID`` (how Gemini answers a wrong key)."""
    return status in (401, 403) or (status == 400 and b'"API_KEY_INVALID"' in body[:8192])


def error_message(body: bytes, api_key: str | None = None) -> str:
    """The server's own words for an error response, short and with any key masked."""
    text = ""
    try:
        err = _error_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        text = body[:_MAX_MESSAGE].decode("utf-8", "replace").strip()
    else:
        if isinstance(err.error, _ErrorDetail):
            text = err.error.message or err.error.type or err.error.status or ""
        elif isinstance(err.error, str):
            text = err.error
        text = text or err.message or err.detail or ""
    text = one_line(text, _MAX_MESSAGE)  # a server's control bytes never reach a terminal
    return redact(text, api_key) if text.strip() else "(empty body)"


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
