"""Anthropic Messages: ``POST {base_url}/messages`` with ``x-api-key`` and ``anthropic-version``.

https://docs.anthropic.com/en/api/messages. Differences from OpenAI handled here: the system
prompt is a top-level ``system`` field, ``max_tokens`` is required, ``stop`` is
``stop_sequences``, there is no ``n`` (the client fans out n calls) and no ``seed``; the reply is a
list of content blocks, and stop reasons are mapped onto OpenAI's (``end_turn`` -> ``stop``...).
"""

from __future__ import annotations

from typing import Any

import msgspec

from engine.errors import ReplyError
from engine.providers import normalise_finish
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


class _Block(msgspec.Struct):
    type: str = "text"
    text: str | None = None


class _Usage(msgspec.Struct):
    input_tokens: int | None = 0
    output_tokens: int | None = 0


class _Reply(msgspec.Struct):
    content: list[_Block]
    stop_reason: str | None = None
    usage: _Usage | None = None
    model: str | None = ""


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(_Reply)


class AnthropicProvider:
    name = "anthropic"
    supports_n = False

    __slots__ = ("base_url", "model", "url")

    def __init__(self, base_url: str, model: str):
        self.base_url = base_url.rstrip("/")
        self.model = model
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

    def decode(self, body: bytes) -> Completion:
        try:
            reply = _decoder.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ReplyError(f"unusable reply from {self.url}: {exc}") from None
        texts = [b.text for b in reply.content if b.type == "text" and b.text is not None]
        if not texts and reply.stop_reason is None:
            raise ReplyError(f"reply from {self.url} has no content")
        u = reply.usage
        usage = Usage(u.input_tokens or 0, u.output_tokens or 0) if u is not None else Usage()
        choice = Choice("".join(texts), normalise_finish(reply.stop_reason, _FINISH))
        return Completion(choices=[choice], usage=usage, model=reply.model or self.model)
