"""Anthropic Messages: ``POST {base_url}/messages`` with ``x-api-key`` and ``anthropic-version``.

https://docs.anthropic.com/en/api/messages. Differences from OpenAI handled here: the system
prompt is a top-level ``system`` field, ``max_tokens`` is required, ``stop`` is
``stop_sequences``, there is no ``n`` (the client fans out n calls) and no ``seed``; the reply is a
list of content blocks, and stop reasons are mapped onto OpenAI's (``end_turn`` -> ``stop``...).
Rate limits come as ``anthropic-ratelimit-{requests,tokens}-{limit,remaining,reset}``, the reset
an RFC 3339 time (https://docs.anthropic.com/en/api/rate-limits); ``limits`` renames them.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import msgspec

from engine.errors import ReplyError
from engine.request.providers import (
    MAX_WAIT_S,
    FinishReason,
    TokenCount,
    decode_reply,
    normalise_finish,
    sane_limits,
)
from engine.types import ChatRequest, Choice, Completion, Usage

API_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 1024  # the API requires max_tokens; used when the request leaves it open

_FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}


EMPTY_OK = frozenset({"max_tokens", "refusal"})  # stop reasons that may come with no text


class _Block(msgspec.Struct):
    type: str = "text"
    text: str | None = None


class _Usage(msgspec.Struct):
    input_tokens: TokenCount | None = 0
    output_tokens: TokenCount | None = 0


class _Reply(msgspec.Struct):
    content: list[_Block]
    stop_reason: FinishReason | None = None
    usage: _Usage | None = None
    model: str | None = ""


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(_Reply)


class AnthropicProvider:
    name = "anthropic"
    supports_n = False

    __slots__ = ("base_url", "max_wait_s", "model", "url")

    def __init__(self, base_url: str, model: str, max_wait_s: float = MAX_WAIT_S):
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.max_wait_s = max_wait_s
        self.url = f"{self.base_url}/messages"

    def __repr__(self) -> str:
        return f"AnthropicProvider(url={self.url!r}, model={self.model!r})"

    def headers(self, api_key: str | None) -> dict[str, str]:
        h = {"Content-Type": "application/json", "anthropic-version": API_VERSION}
        if api_key:
            h["x-api-key"] = api_key
        return h

    def encode(self, request: ChatRequest) -> bytes:
        system = [m.content for m in request.messages if m.role == "system"]
        messages = [{"role": m.role, "content": m.content} for m in request.messages if m.role != "system"]
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_tokens": request.max_tokens if request.max_tokens is not None else DEFAULT_MAX_TOKENS,
            "temperature": request.temperature,
        }
        if system:
            body["system"] = "\n\n".join(system)
        if request.top_p is not None:
            body["top_p"] = request.top_p
        if request.stop:
            body["stop_sequences"] = list(request.stop)
        return _encoder.encode(body)

    def limits(self, headers: Mapping[str, str]) -> Mapping[str, str]:
        """``anthropic-ratelimit-*`` as ``x-ratelimit-*``, the reset time as seconds from now."""
        if "anthropic-ratelimit-requests-remaining" not in headers and (
            "anthropic-ratelimit-tokens-remaining" not in headers
        ):
            return sane_limits(headers, self.max_wait_s)
        out = {k: headers[k] for k in ("retry-after", "retry-after-ms") if k in headers}
        now = time.time()
        for kind in ("requests", "tokens"):  # "tokens": the most restrictive of input and output
            for field in ("limit", "remaining"):
                if (value := headers.get(f"anthropic-ratelimit-{kind}-{field}")) is not None:
                    out[f"x-ratelimit-{field}-{kind}"] = value
            if (reset := _seconds_until(headers.get(f"anthropic-ratelimit-{kind}-reset"), now)) is not None:
                out[f"x-ratelimit-reset-{kind}"] = f"{reset:.3f}"
        return sane_limits(out, self.max_wait_s)

    def decode(self, body: bytes) -> Completion:
        reply = decode_reply(_decoder, body, self.url)
        texts = [b.text for b in reply.content if b.type == "text" and b.text is not None]
        if not texts and reply.stop_reason not in EMPTY_OK:
            raise ReplyError(f"reply from {self.url} has no text content")
        u = reply.usage
        usage = Usage(u.input_tokens or 0, u.output_tokens or 0) if u is not None else Usage()
        choice = Choice("".join(texts), normalise_finish(reply.stop_reason, _FINISH))
        return Completion(choices=[choice], usage=usage, model=reply.model or self.model)


def _seconds_until(stamp: str | None, now: float) -> float | None:
    """An RFC 3339 time (``2025-08-21T12:40:59Z``) as seconds from ``now``; None if unreadable."""
    if not stamp:
        return None
    try:
        return max(0.0, datetime.fromisoformat(stamp).timestamp() - now)
    except (ValueError, OverflowError, OSError):
        return None
