"""The OpenAI chat-completions request as msgspec Structs: one definition for both servers.

The simulator (``engine.sim.server``) and the CPU student server (``trainer.serve``) validate a
request body with :func:`parse_chat_request`; a bad field becomes :class:`RequestInvalid` with an
OpenAI-shaped message and the offending ``param`` (``max_tokens``, ``messages``...). Unknown fields
are accepted, as OpenAI-compatible servers do (clients send ``user``, ``metadata``...). A pure
module: msgspec only, so the trainer may import it.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

import msgspec

MAX_N = 128


class RequestInvalid(Exception):
    """A request the server refuses: ``status`` (400 or 404), the OpenAI ``param`` and ``code``."""

    def __init__(self, message: str, *, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


class TextPart(msgspec.Struct, tag_field="type", tag="text"):
    """``{"type": "text", "text": ...}``: the only content part the servers take."""

    text: str


class ChatMessage(msgspec.Struct, kw_only=True):
    role: str
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


Positive = Annotated[int, msgspec.Meta(ge=1)]
Stop = Annotated[str, msgspec.Meta(min_length=1)]


class ChatCompletionRequest(msgspec.Struct, kw_only=True):
    """The fields the servers read; ``max_completion_tokens`` is OpenAI's newer ``max_tokens``."""

    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1)]
    model: str | None = None
    max_tokens: Positive | None = None
    max_completion_tokens: Positive | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, msgspec.Meta(gt=0, le=1)] | None = None
    n: Annotated[int, msgspec.Meta(ge=1, le=MAX_N)] | None = None
    seed: int | None = None
    stop: Stop | list[Stop] | None = None
    stream: bool | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    ignore_eos: bool = False  # vLLM extras
    return_token_ids: bool = False

    @property
    def limit(self) -> int | None:
        return self.max_tokens if self.max_tokens is not None else self.max_completion_tokens

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


_decoder = msgspec.json.Decoder(ChatCompletionRequest)
_AT = re.compile(r"at `\$\.([A-Za-z_]+)")


def parse_chat_request(body: bytes | dict[str, Any]) -> ChatCompletionRequest:
    """Validate raw JSON bytes (or an already parsed object); ``RequestInvalid`` naming the field."""
    try:
        if isinstance(body, bytes | bytearray | memoryview):
            return _decoder.decode(body)
        return msgspec.convert(body, ChatCompletionRequest)
    except msgspec.ValidationError as exc:
        found = _AT.search(str(exc))
        param = found.group(1) if found else None
        if "missing required field `messages`" in str(exc):
            param = "messages"
        raise RequestInvalid(f"invalid request: {exc}", param=param) from None
    except msgspec.DecodeError as exc:
        raise RequestInvalid(f"request body is not valid JSON: {exc}") from None
