"""OpenAI-compatible chat completions: ``POST {base_url}/chat/completions`` with a Bearer key.

Spoken by OpenAI, vLLM, llama.cpp, most gateways, our simulator and our CPU student server.
Request fields follow https://platform.openai.com/docs/api-reference/chat/create, sent as the
model's row of ``accepts.py`` allows: the limit as ``max_completion_tokens`` (``max_tokens`` is
deprecated), no temperature/top_p for reasoning models, ``reasoning_effort`` from the endpoint's
``reasoning.effort`` (``reasoning.budget_tokens`` is added to the limit: reasoning tokens count
against it). The response is decoded into a small view Struct (only the fields we use), which is
also the validation. Usage as billed: ``completion_tokens`` already holds the reasoning tokens
(``completion_tokens_details.reasoning_tokens``), ``prompt_tokens`` the cached ones
(``prompt_tokens_details.cached_tokens``). The reasoning text of OpenAI-compatible servers (vLLM
serving DeepSeek-R1, Qwen3, gpt-oss: ``message.reasoning_content`` or ``message.reasoning``) goes
to ``Choice.reasoning``, never into the answer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

import msgspec

from fairdistill.engine.errors import ReplyError
from fairdistill.engine.request.providers.base import (
    MAX_CHOICES,
    FinishReason,
    ModelWire,
    TokenCount,
    decode_reply,
    sane_limits,
)
from fairdistill.engine.types import ChatRequest, Choice, Completion, Usage

EMPTY_OK = frozenset({"length", "content_filter"})  # stop reasons that may come with no text


class _Message(msgspec.Struct):
    content: str | None = None
    reasoning_content: str | None = None  # vLLM (older), DeepSeek
    reasoning: str | dict[str, Any] | None = None  # vLLM (newer), OpenRouter; only a string is kept


class _Choice(msgspec.Struct):
    message: _Message | None = None
    text: str | None = None  # legacy completions shape, accepted for lenient servers
    finish_reason: FinishReason | None = None


class _PromptDetails(msgspec.Struct):
    cached_tokens: TokenCount | None = 0


class _CompletionDetails(msgspec.Struct):
    reasoning_tokens: TokenCount | None = 0


class _Usage(msgspec.Struct):
    prompt_tokens: TokenCount | None = 0
    completion_tokens: TokenCount | None = 0
    prompt_tokens_details: _PromptDetails | None = None
    completion_tokens_details: _CompletionDetails | None = None


class _Reply(msgspec.Struct):
    choices: Annotated[list[_Choice], msgspec.Meta(max_length=MAX_CHOICES)]
    usage: _Usage | None = None
    model: str | None = ""


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(_Reply)


class OpenAIProvider(ModelWire):
    name = "openai"
    __slots__ = ()

    def __init__(self, base_url: str, model: str, *args: Any, **kw: Any):
        super().__init__(base_url, model, *args, **kw)
        self.url = f"{self.base_url}/chat/completions"

    def headers(self, api_key: str | None) -> dict[str, str]:
        h = {"Content-Type": "application/json"}
        if api_key:
            h["Authorization"] = f"Bearer {api_key}"
        return h

    def encode(self, request: ChatRequest) -> bytes:
        acc, r = self.accepts, self.reasoning
        body: dict[str, Any] = {"model": self.model, "messages": request.messages}
        if request.max_tokens is not None:
            body[acc.token_limit] = request.max_tokens + self.budget()
        if acc.temperature:
            body["temperature"] = request.temperature
        if acc.top_p and request.top_p is not None:
            body["top_p"] = request.top_p
        if request.n != 1:
            body["n"] = request.n
        if acc.seed and request.seed is not None:
            body["seed"] = request.seed
        if acc.stop and request.stop:
            body["stop"] = list(request.stop)
        if r is not None and r.effort is not None:
            body["reasoning_effort"] = r.effort
        return _encoder.encode(body)

    def limits(self, headers: Mapping[str, str]) -> Mapping[str, str]:
        return sane_limits(headers, self.max_wait_s)  # admission reads OpenAI's x-ratelimit-* names

    def decode(self, body: bytes) -> Completion:
        reply = decode_reply(_decoder, body, self.url)
        if not reply.choices:
            raise ReplyError(f"reply from {self.url} has no choices")
        keep = self.keep_thoughts()
        choices = []
        for i, c in enumerate(reply.choices):
            text = c.message.content if c.message is not None else c.text
            if text is None and c.finish_reason not in EMPTY_OK:
                raise ReplyError(f"reply from {self.url}: choice {i} has no message text")
            thought = _reasoning(c.message) if keep else None
            choices.append(Choice(text or "", c.finish_reason, thought))
        return Completion(choices=choices, usage=_usage(reply.usage), model=reply.model or self.model)


def _reasoning(message: _Message | None) -> str | None:
    if message is None:
        return None
    text = message.reasoning_content or (message.reasoning if isinstance(message.reasoning, str) else None)
    return text or None


def _usage(u: _Usage | None) -> Usage:
    if u is None:
        return Usage()
    cached = (u.prompt_tokens_details.cached_tokens or 0) if u.prompt_tokens_details else 0
    thinking = (u.completion_tokens_details.reasoning_tokens or 0) if u.completion_tokens_details else 0
    prompt, completion = u.prompt_tokens or 0, u.completion_tokens or 0
    return Usage(prompt, completion, min(thinking, completion), min(cached, prompt))
