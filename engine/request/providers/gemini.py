"""Gemini generateContent: ``POST {base_url}/models/{model}:generateContent``.

https://ai.google.dev/api/generate-content. The key goes in the ``x-goog-api-key`` header, never
in the ``?key=`` query string, so it cannot end up in a URL that gets logged. Roles are ``user``
and ``model``; the system prompt is ``systemInstruction``; sampling parameters live in
``generationConfig`` (``candidateCount`` is n), each only where the endpoint's ``accepts`` says so.
Finish reasons are mapped onto OpenAI's.

Reasoning: ``generationConfig.thinkingConfig`` with ``thinkingBudget`` (``reasoning.budget_tokens``;
``effort = "none"`` is a budget of 0) or ``thinkingLevel`` (``reasoning.effort``), and
``includeThoughts``; ``maxOutputTokens`` is the answer's limit + the budget. Thought parts
(``thought: true``) become ``Choice.reasoning``. Usage as billed: ``thoughtsTokenCount`` is ADDED
to ``candidatesTokenCount`` (thinking is output, billed), ``cachedContentTokenCount`` is inside
``promptTokenCount``. A prompt blocked by safety (``promptFeedback.blockReason``, no candidates)
is a ``Blocked`` error naming the reason: the record fails, and it is not sent again.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

import msgspec

from fairdistill.engine.errors import Blocked, ReplyError, one_line
from fairdistill.engine.request.providers.base import (
    MAX_CHOICES,
    FinishReason,
    ModelWire,
    TokenCount,
    decode_reply,
    normalise_finish,
    sane_limits,
)
from fairdistill.engine.types import ChatRequest, Choice, Completion, Usage

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
    thoughts_token_count: TokenCount | None = 0
    cached_content_token_count: TokenCount | None = 0


class _Feedback(msgspec.Struct, rename="camel"):
    block_reason: Annotated[str, msgspec.Meta(max_length=64)] | None = None
    block_reason_message: str | None = None


class _Reply(msgspec.Struct, rename="camel"):
    candidates: Annotated[list[_Candidate], msgspec.Meta(max_length=MAX_CHOICES)] = []
    usage_metadata: _Usage | None = None
    model_version: str | None = ""
    prompt_feedback: _Feedback | None = None


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(_Reply)


class GeminiProvider(ModelWire):
    name = "gemini"
    __slots__ = ()

    def __init__(self, base_url: str, model: str, *args: Any, **kw: Any):
        super().__init__(base_url, model, *args, **kw)
        self.url = f"{self.base_url}/models/{model}:generateContent"

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
        body: dict[str, Any] = {"contents": contents, "generationConfig": self._config(request)}
        if system:
            body["systemInstruction"] = {"parts": [{"text": "\n\n".join(system)}]}
        return _encoder.encode(body)

    def _config(self, request: ChatRequest) -> dict[str, Any]:
        """``generationConfig``: what the model accepts, and the thinking controls."""
        acc = self.accepts
        config: dict[str, Any] = {}
        if acc.temperature:
            config["temperature"] = request.temperature
        if request.max_tokens is not None:
            config["maxOutputTokens"] = request.max_tokens + self.budget()
        if acc.top_p and request.top_p is not None:
            config["topP"] = request.top_p
        if request.n != 1:
            config["candidateCount"] = request.n
        if acc.seed and request.seed is not None:
            config["seed"] = request.seed
        if acc.stop and request.stop:
            config["stopSequences"] = list(request.stop)
        if (thinking := self._thinking()) is not None:
            config["thinkingConfig"] = thinking
        return config

    def _thinking(self) -> dict[str, Any] | None:
        r = self.reasoning
        if r is None:
            return None
        out: dict[str, Any] = {}
        if r.budget_tokens is not None:
            out["thinkingBudget"] = r.budget_tokens
        elif r.effort == "none":
            out["thinkingBudget"] = 0
        elif r.effort is not None:
            out["thinkingLevel"] = r.effort.upper()  # the SDK's ThinkingLevel: LOW, MEDIUM, HIGH...
        if r.include_thoughts is not None:
            out["includeThoughts"] = r.include_thoughts
        return out or None

    def limits(self, headers: Mapping[str, str]) -> Mapping[str, str]:
        return sane_limits(headers, self.max_wait_s)  # no rate-limit headers; a 429 may carry Retry-After

    def decode(self, body: bytes) -> Completion:
        reply = decode_reply(_decoder, body, self.url)
        if not reply.candidates:
            if (fb := reply.prompt_feedback) is not None and fb.block_reason:
                why = f": {one_line(fb.block_reason_message, 200)}" if fb.block_reason_message else ""
                raise Blocked(f"{self.model} blocked the prompt ({one_line(fb.block_reason, 64)}){why}")
            raise ReplyError(f"reply from {self.url} has no candidates")
        keep = self.keep_thoughts()
        choices = []
        for i, c in enumerate(reply.candidates):
            parts = c.content.parts if c.content is not None else []
            texts = [p.text for p in parts if p.text is not None and not p.thought]
            if not texts and normalise_finish(c.finish_reason, _FINISH) not in EMPTY_OK:
                raise ReplyError(f"reply from {self.url}: candidate {i} has no text")
            thoughts = [p.text for p in parts if p.text and p.thought] if keep else []
            choices.append(
                Choice("".join(texts), normalise_finish(c.finish_reason, _FINISH), "".join(thoughts) or None)
            )
        return Completion(
            choices=choices, usage=_usage(reply.usage_metadata), model=reply.model_version or self.model
        )


def _usage(u: _Usage | None) -> Usage:
    """Output as billed: thinking tokens are counted apart from the candidates' and added to them."""
    if u is None:
        return Usage()
    prompt, thoughts = u.prompt_token_count or 0, u.thoughts_token_count or 0
    completion = (u.candidates_token_count or 0) + thoughts
    return Usage(prompt, completion, thoughts, min(u.cached_content_token_count or 0, prompt))
