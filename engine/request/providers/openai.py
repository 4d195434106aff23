"""OpenAI-compatible chat completions: ``POST {base_url}/chat/completions`` with a Bearer key.

Spoken by OpenAI, vLLM, llama.cpp, most gateways, our simulator and our CPU student server.
Request fields follow https://platform.openai.com/docs/api-reference/chat/create; the response
is decoded into a small view Struct (only the fields we use), which is also the validation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

import msgspec

from engine.errors import ReplyError
from engine.request.providers import (
    MAX_CHOICES,
    MAX_WAIT_S,
    FinishReason,
    TokenCount,
    decode_reply,
    sane_limits,
)
from engine.types import ChatRequest, Choice, Completion, Usage

EMPTY_OK = frozenset({"length", "content_filter"})  # stop reasons that may come with no text


class _Message(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    message: _Message | None = None
    text: str | None = None  # legacy completions shape, accepted for lenient servers
    finish_reason: FinishReason | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: TokenCount | None = 0
    completion_tokens: TokenCount | None = 0


class _Reply(msgspec.Struct):
    choices: Annotated[list[_Choice], msgspec.Meta(max_length=MAX_CHOICES)]
    usage: _Usage | None = None
    model: str | None = ""


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(_Reply)


class OpenAIProvider:
    name = "openai"
    supports_n = True

    __slots__ = ("base_url", "max_wait_s", "model", "url")

    def __init__(self, base_url: str, model: str, max_wait_s: float = MAX_WAIT_S):
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.max_wait_s = max_wait_s
        self.url = f"{self.base_url}/chat/completions"

    def __repr__(self) -> str:
        return f"OpenAIProvider(url={self.url!r}, model={self.model!r})"

    def headers(self, api_key: str | None) -> dict[str, str]:
        h = {"Content-Type": "application/json"}
        if api_key:
            h["Authorization"] = f"Bearer {api_key}"
        return h

    def encode(self, request: ChatRequest) -> bytes:
        body: dict[str, Any] = {"model": self.model, "messages": request.messages}
        if request.max_tokens is not None:
            body["max_tokens"] = request.max_tokens
        body["temperature"] = request.temperature
        if request.top_p is not None:
            body["top_p"] = request.top_p
        if request.n != 1:
            body["n"] = request.n
        if request.seed is not None:
            body["seed"] = request.seed
        if request.stop:
            body["stop"] = list(request.stop)
        return _encoder.encode(body)

    def limits(self, headers: Mapping[str, str]) -> Mapping[str, str]:
        return sane_limits(headers, self.max_wait_s)  # admission reads OpenAI's x-ratelimit-* names

    def decode(self, body: bytes) -> Completion:
        reply = decode_reply(_decoder, body, self.url)
        if not reply.choices:
            raise ReplyError(f"reply from {self.url} has no choices")
        choices = []
        for i, c in enumerate(reply.choices):
            text = c.message.content if c.message is not None else c.text
            if text is None and c.finish_reason not in EMPTY_OK:
                raise ReplyError(f"reply from {self.url}: choice {i} has no message text")
            choices.append(Choice(text or "", c.finish_reason))
        u = reply.usage
        usage = Usage(u.prompt_tokens or 0, u.completion_tokens or 0) if u is not None else Usage()
        return Completion(choices=choices, usage=usage, model=reply.model or self.model)
