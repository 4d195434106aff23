"""Gemini generateContent: ``POST {base_url}/models/{model}:generateContent``.

https://ai.google.dev/api/generate-content. The key goes in the ``x-goog-api-key`` header, never
in the ``?key=`` query string, so it cannot end up in a URL that gets logged. Roles are ``user``
and ``model``; the system prompt is ``systemInstruction``; sampling parameters live in
``generationConfig`` (``candidateCount`` is n). Finish reasons are mapped onto OpenAI's.
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
    normalise_finish,
    sane_limits,
)
from engine.types import ChatRequest, Choice, Completion, Usage

_FINISH = {
    "STOP": "stop",
    "MAX_TOKENS": "length",
    "SAFETY": "content_filter",
    "RECITATION": "content_filter",
    "BLOCKLIST": "content_filter",
    "PROHIBITED_CONTENT": "content_filter",
    "SPII": "content_filter",
}


EMPTY_OK = frozenset({"length", "content_filter"})  # (mapped) finish reasons that may have no text


class _Part(msgspec.Struct):
    text: str | None = None
    thought: bool | None = None  # "thinking" parts are not part of the answer


class _Content(msgspec.Struct):
    parts: list[_Part] = []


class _Candidate(msgspec.Struct, rename="camel"):  # wire names are camelCase
    content: _Content | None = None
    finish_reason: FinishReason | None = None


class _Usage(msgspec.Struct, rename="camel"):
    prompt_token_count: TokenCount | None = 0
    candidates_token_count: TokenCount | None = 0


class _Reply(msgspec.Struct, rename="camel"):
    candidates: Annotated[list[_Candidate], msgspec.Meta(max_length=MAX_CHOICES)]
    usage_metadata: _Usage | None = None
    model_version: str | None = ""


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(_Reply)


class GeminiProvider:
    name = "gemini"
    supports_n = True

    __slots__ = ("base_url", "max_wait_s", "model", "url")

    def __init__(self, base_url: str, model: str, max_wait_s: float = MAX_WAIT_S):
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.max_wait_s = max_wait_s
        self.url = f"{self.base_url}/models/{model}:generateContent"

    def __repr__(self) -> str:
        return f"GeminiProvider(url={self.url!r}, model={self.model!r})"

    def headers(self, api_key: str | None) -> dict[str, str]:
        h = {"Content-Type": "application/json"}
        if api_key:
            h["x-goog-api-key"] = api_key
        return h

    def encode(self, request: ChatRequest) -> bytes:
        system = [m.content for m in request.messages if m.role == "system"]
        contents = [
            {"role": "model" if m.role == "assistant" else "user", "parts": [{"text": m.content}]}
            for m in request.messages
            if m.role != "system"
        ]
        config: dict[str, Any] = {"temperature": request.temperature}
        if request.max_tokens is not None:
            config["maxOutputTokens"] = request.max_tokens
        if request.top_p is not None:
            config["topP"] = request.top_p
        if request.n != 1:
            config["candidateCount"] = request.n
        if request.seed is not None:
            config["seed"] = request.seed
        if request.stop:
            config["stopSequences"] = list(request.stop)
        body: dict[str, Any] = {"contents": contents, "generationConfig": config}
        if system:
            body["systemInstruction"] = {"parts": [{"text": "\n\n".join(system)}]}
        return _encoder.encode(body)

    def limits(self, headers: Mapping[str, str]) -> Mapping[str, str]:
        return sane_limits(headers, self.max_wait_s)  # no rate-limit headers; a 429 may carry Retry-After

    def decode(self, body: bytes) -> Completion:
        reply = decode_reply(_decoder, body, self.url)
        if not reply.candidates:
            raise ReplyError(f"reply from {self.url} has no candidates")
        choices = []
        for i, c in enumerate(reply.candidates):
            parts = c.content.parts if c.content is not None else []
            texts = [p.text for p in parts if p.text is not None and not p.thought]
            if not texts and normalise_finish(c.finish_reason, _FINISH) not in EMPTY_OK:
                raise ReplyError(f"reply from {self.url}: candidate {i} has no text")
            text = "".join(texts)
            choices.append(Choice(text, normalise_finish(c.finish_reason, _FINISH)))
        u = reply.usage_metadata
        usage = Usage(u.prompt_token_count or 0, u.candidates_token_count or 0) if u is not None else Usage()
        return Completion(choices=choices, usage=usage, model=reply.model_version or self.model)
