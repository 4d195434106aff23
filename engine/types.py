"""Wire-neutral request and response values shared by providers, cache, admission and stages."""

from __future__ import annotations

import msgspec

from fairdistill.engine.rundir.schema import (
    Msg as Message,  # the one message Struct: records and requests alike
)
from fairdistill.engine.rundir.schema import Response

__all__ = ["ChatRequest", "Choice", "Completion", "Message", "Usage", "response_record", "user"]


class ChatRequest(msgspec.Struct, frozen=True, kw_only=True):
    """One chat call. ``sample_index`` is not sent; it keeps repeated samples apart in the cache."""

    messages: tuple[Message, ...]
    max_tokens: int | None = None
    temperature: float = 0.0
    top_p: float | None = None
    n: int = 1
    seed: int | None = None
    stop: tuple[str, ...] | None = None
    sample_index: int = 0


class Usage(msgspec.Struct, frozen=True):
    """Tokens as billed. ``prompt_tokens`` is every input token, ``cached_tokens`` (cache reads)
    and ``cache_write_tokens`` (Anthropic cache writes) among them; ``completion_tokens`` is every
    output token, ``reasoning_tokens`` (thinking) among them."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            *(
                a + b
                for a, b in zip(msgspec.structs.astuple(self), msgspec.structs.astuple(other), strict=True)
            )
        )


class Choice(msgspec.Struct, frozen=True):
    """One answer; ``reasoning`` is the model's reasoning trace, kept apart from the text that
    grading and review read (None: the model returned none)."""

    text: str
    finish_reason: str | None = None
    reasoning: str | None = None


class Completion(msgspec.Struct, kw_only=True):
    """What a provider returned, plus what the engine learned while getting it."""

    choices: list[Choice]
    usage: Usage
    model: str = ""
    cached: bool = False
    latency_s: float = 0.0
    attempts: int = 1
    cost_usd: float = 0.0

    @property
    def text(self) -> str:
        return self.choices[0].text


def user(content: str, system: str | None = None) -> tuple[Message, ...]:
    """Messages for a single-turn chat."""
    msgs = [Message("system", system)] if system else []
    msgs.append(Message("user", content))
    return tuple(msgs)


def response_record(record_id: str, done: Completion) -> Response:
    """`fair generate`'s record of one answered input line: texts, their reasoning, usage."""
    u, choices = done.usage, done.choices
    if len(choices) == 1:  # the common case, without the comprehensions
        c = choices[0]
        return Response(
            id=record_id,
            texts=[c.text],
            finish_reasons=[c.finish_reason],
            prompt_tokens=u.prompt_tokens,
            completion_tokens=u.completion_tokens,
            reasoning_tokens=u.reasoning_tokens,
            cached_tokens=u.cached_tokens,
            reasonings=[c.reasoning] if c.reasoning else [],
        )
    return Response(
        id=record_id,
        texts=[c.text for c in done.choices],
        finish_reasons=[c.finish_reason for c in done.choices],
        prompt_tokens=u.prompt_tokens,
        completion_tokens=u.completion_tokens,
        reasoning_tokens=u.reasoning_tokens,
        cached_tokens=u.cached_tokens,
        reasonings=[c.reasoning for c in done.choices] if any(c.reasoning for c in done.choices) else [],
    )
