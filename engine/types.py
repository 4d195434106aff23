"""Wire-neutral request and response values shared by providers, cache, admission and stages."""

from __future__ import annotations

import msgspec

from engine.rundir.schema import Msg as Message  # the one message Struct: records and requests alike

__all__ = ["ChatRequest", "Choice", "Completion", "Message", "Usage", "user"]


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
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Choice(msgspec.Struct, frozen=True):
    text: str
    finish_reason: str | None = None


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
