"""Anthropic Messages: ``POST {base_url}/messages`` with ``x-api-key`` and ``anthropic-version``.

https://docs.anthropic.com/en/api/messages. Differences from OpenAI handled here: the system
prompt is a top-level ``system`` field, ``max_tokens`` is required, ``stop`` is
``stop_sequences``, there is no ``n`` (the client fans out n calls) and no ``seed``; the reply is a
list of content blocks, and stop reasons are mapped onto OpenAI's (``end_turn`` -> ``stop``...).
Rate limits come as ``anthropic-ratelimit-{requests,tokens}-{limit,remaining,reset}``, the reset
an RFC 3339 time (https://docs.anthropic.com/en/api/rate-limits); ``limits`` renames them.

Today's ``MessageCreateParams`` has no temperature/top_p/top_k: they are sent only where the
endpoint's ``accepts`` says so (``accepts.py``). Reasoning: ``thinking = {type: "enabled",
budget_tokens}`` (``reasoning.budget_tokens``, or a budget for ``reasoning.effort``) with
``max_tokens`` = the answer's limit + the budget. Thinking blocks become ``Choice.reasoning``;
usage adds ``cache_read_input_tokens`` and ``cache_creation_input_tokens`` to ``input_tokens`` (the
API counts them apart), and ``output_tokens`` already holds the thinking.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import msgspec

from fairdistill.engine.errors import ReplyError
from fairdistill.engine.request.durations import until_rfc3339
from fairdistill.engine.request.providers.base import (
    FinishReason,
    ModelWire,
    TokenCount,
    decode_reply,
    normalise_finish,
    sane_limits,
)
from fairdistill.engine.types import ChatRequest, Choice, Completion, Usage

API_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 1024  # the API requires max_tokens; used when the request leaves it open
# reasoning.effort as a thinking budget (the API's smallest is 1024); "none": no thinking
EFFORT_BUDGET = {"minimal": 1024, "low": 1024, "medium": 4096, "high": 16384}

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
    thinking: str | None = None  # type "thinking" (its signature is not kept)


class _Usage(msgspec.Struct):
    input_tokens: TokenCount | None = 0
    output_tokens: TokenCount | None = 0
    cache_read_input_tokens: TokenCount | None = 0
    cache_creation_input_tokens: TokenCount | None = 0


class _Reply(msgspec.Struct):
    content: list[_Block]
    stop_reason: FinishReason | None = None
    usage: _Usage | None = None
    model: str | None = ""


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(_Reply)


class AnthropicProvider(ModelWire):
    name = "anthropic"
    __slots__ = ()

    def __init__(self, base_url: str, model: str, *args: Any, **kw: Any):
        super().__init__(base_url, model, *args, **kw)
        self.url = f"{self.base_url}/messages"

    def headers(self, api_key: str | None) -> dict[str, str]:
        h = {"Content-Type": "application/json", "anthropic-version": API_VERSION}
        if api_key:
            h["x-api-key"] = api_key
        return h

    def encode(self, request: ChatRequest) -> bytes:
        acc = self.accepts
        system = [m.content for m in request.messages if m.role == "system"]
        messages = [{"role": m.role, "content": m.content} for m in request.messages if m.role != "system"]
        limit = request.max_tokens if request.max_tokens is not None else DEFAULT_MAX_TOKENS
        body: dict[str, Any] = {"model": self.model, "messages": messages, "max_tokens": limit}
        if budget := self.budget():
            body["thinking"] = {"type": "enabled", "budget_tokens": budget}
            body["max_tokens"] = limit + budget  # the budget is part of max_tokens
        if acc.temperature:
            body["temperature"] = request.temperature
        if system:
            body["system"] = "\n\n".join(system)
        if acc.top_p and request.top_p is not None:
            body["top_p"] = request.top_p
        if acc.stop and request.stop:
            body["stop_sequences"] = list(request.stop)
        return _encoder.encode(body)

    def budget(self) -> int:
        """``reasoning.budget_tokens``, else the budget of ``reasoning.effort``; 0: no thinking."""
        r = self.reasoning
        if r is None:
            return 0
        return r.budget_tokens or EFFORT_BUDGET.get(r.effort or "", 0)

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
            if (reset := until_rfc3339(headers.get(f"anthropic-ratelimit-{kind}-reset"), now)) is not None:
                out[f"x-ratelimit-reset-{kind}"] = f"{reset:.3f}"
        return sane_limits(out, self.max_wait_s)

    def decode(self, body: bytes) -> Completion:
        reply = decode_reply(_decoder, body, self.url)
        texts = [b.text for b in reply.content if b.type == "text" and b.text is not None]
        if not texts and reply.stop_reason not in EMPTY_OK:
            raise ReplyError(f"reply from {self.url} has no text content")
        thoughts = [b.thinking for b in reply.content if b.type == "thinking" and b.thinking]
        thought = "\n\n".join(thoughts) if thoughts and self.keep_thoughts() else None
        choice = Choice("".join(texts), normalise_finish(reply.stop_reason, _FINISH), thought)
        return Completion(choices=[choice], usage=_usage(reply.usage), model=reply.model or self.model)


def _usage(u: _Usage | None) -> Usage:
    """Input tokens as billed: the API counts cache reads and writes apart from ``input_tokens``."""
    if u is None:
        return Usage()
    read, write = u.cache_read_input_tokens or 0, u.cache_creation_input_tokens or 0
    return Usage((u.input_tokens or 0) + read + write, u.output_tokens or 0, 0, read, write)
