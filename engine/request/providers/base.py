"""What the three wires share (``engine.request.providers`` has the overview): the
``Provider`` protocol, ``ModelWire`` (URL, model, what it accepts, reasoning controls), the
reply decoding helper, the rate-limit header sanitiser, error-body reading and key redaction.
The wire modules (``openai``, ``anthropic``, ``gemini``) import from here; the package's
``make_provider`` imports them (imports flow one way: no cycle).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Annotated, Protocol

import msgspec

from fairdistill.engine.accepts import Accepts, accepts_for, refused_param
from fairdistill.engine.config import ReasoningConfig
from fairdistill.engine.errors import ReplyError, one_line
from fairdistill.engine.request.durations import clamp, delay_seconds, reset_duration, retry_after
from fairdistill.engine.types import ChatRequest, Completion

# Shared by the decoders: a token count is a non-negative int below 2**40 (no real reply comes
# near; a usage beyond 64 bits would otherwise reach the cost sums and the manifest), and a stop
# reason is a short word.
TokenCount = Annotated[int, msgspec.Meta(ge=0, le=2**40)]
FinishReason = Annotated[str, msgspec.Meta(max_length=64)]
MAX_CHOICES = 128  # n is at most 128 (engine.config.Choices)
MAX_WAIT_S = 600.0  # default ceiling of a server-given pause (EndpointConfig.max_wait_s)


class Provider(Protocol):
    name: str
    url: str
    accepts: Accepts  # what the model takes (``accepts.py``); ``drop`` narrows it
    dropped: tuple[str, ...]  # parameters dropped after a 400 named them, in order

    @property
    def supports_n(self) -> bool:
        """False: the client issues n separate calls and merges their choices."""
        ...

    def drop(self, param: str) -> bool: ...

    def refused(self, body: bytes) -> str | None: ...

    def headers(self, api_key: str | None) -> dict[str, str]: ...

    def encode(self, request: ChatRequest) -> bytes: ...

    def decode(self, body: bytes) -> Completion: ...

    def limits(self, headers: Mapping[str, str]) -> Mapping[str, str]:
        """The response's rate-limit headers as OpenAI names them (``x-ratelimit-*``,
        ``retry-after``), which is what admission reads."""
        ...


class ModelWire:
    """What the three wires share: the endpoint's URL, model, what the model accepts (the table
    row with the config's ``accepts`` over it) and its reasoning controls. ``drop(param)`` narrows
    ``accepts`` after a 400 named ``param`` (``refused``); the next ``encode`` leaves it out."""

    name = ""
    __slots__ = ("accepts", "base_url", "dropped", "max_wait_s", "model", "reasoning", "url")

    def __init__(
        self,
        base_url: str,
        model: str,
        max_wait_s: float = MAX_WAIT_S,
        *,
        accepts: Accepts | None = None,
        reasoning: ReasoningConfig | None = None,
    ):
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.max_wait_s = max_wait_s
        self.accepts = accepts if accepts is not None else accepts_for(self.name, model)
        self.reasoning = reasoning if self.accepts.reasoning else None
        self.dropped: tuple[str, ...] = ()  # params dropped after a 400, in order
        self.url = ""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(url={self.url!r}, model={self.model!r})"

    @property
    def supports_n(self) -> bool:
        return self.accepts.n

    def refused(self, body: bytes) -> str | None:
        """The parameter a 400 body says this model does not take, or None."""
        return refused_param(self.name, body)

    def drop(self, param: str) -> bool:
        """Stop sending ``param``; False when it is not sent anyway (nothing would change)."""
        narrower = self.accepts.without(param)
        if narrower is None:
            return False
        self.accepts = narrower
        if not narrower.reasoning:
            self.reasoning = None
        self.dropped = (*self.dropped, param)
        return True

    def budget(self) -> int:
        """Thinking tokens allowed on top of the answer's limit (``reasoning.budget_tokens``)."""
        return self.reasoning.budget_tokens or 0 if self.reasoning is not None else 0

    def keep_thoughts(self) -> bool:
        """Whether reasoning text goes on the record (``reasoning.include_thoughts``, default yes)."""
        return self.reasoning is None or self.reasoning.include_thoughts is not False


def decode_reply(decoder: msgspec.json.Decoder, body: bytes, url: str):
    """``decoder.decode(body)``, with every way a body can be unusable as a ``ReplyError``."""
    try:
        return decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ReplyError(f"unusable reply from {url}: {one_line(str(exc), 200)}") from None
    except RecursionError:
        raise ReplyError(f"unusable reply from {url}: JSON nested too deeply") from None


# -- rate-limit headers -----------------------------------------------------------------------

_DURATIONS = ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens")
_COUNTS = (
    "x-ratelimit-remaining-requests",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-limit-requests",
    "x-ratelimit-limit-tokens",
)
_NAMES = (*_DURATIONS, "retry-after", "retry-after-ms", *_COUNTS)
MAX_COUNT = 1e12


def sane_limits(headers: Mapping[str, str], max_wait_s: float = MAX_WAIT_S) -> dict[str, str]:
    """The rate-limit headers admission reads, made safe: durations (``Retry-After`` in seconds or
    as an HTTP date, ``retry-after-ms``, ``x-ratelimit-reset-*``) read by the one parser
    (``engine.request.durations``): a valid one clamped to ``[0, max_wait_s]``, an invalid one
    (``inf``, ``nan``, negative, text) dropped, so the engine's own backoff applies. Counts finite
    and within ``[0, 1e12]`` (a limit at least 1). A ``remaining`` count with neither its reset
    nor its limit is dropped too."""
    for key in _NAMES:
        if key in headers:
            break
    else:
        return {}  # none of them (most replies): nothing to parse
    out: dict[str, str] = {}
    for key in _DURATIONS:
        if (value := clamp(reset_duration(headers.get(key)), max_wait_s)) is not None:
            out[key] = f"{value:.3f}"
    if (value := clamp(retry_after(headers.get("retry-after")), max_wait_s)) is not None:
        out["retry-after"] = f"{value:.3f}"
    if (ms := clamp(delay_seconds(headers.get("retry-after-ms")), max_wait_s * 1000)) is not None:
        out["retry-after-ms"] = f"{ms:.3f}"
    for key in _COUNTS:
        if (n := _float(headers.get(key))) is not None and n >= (1 if "-limit-" in key else 0):
            out[key] = f"{min(n, MAX_COUNT):g}"
    for kind in ("requests", "tokens"):  # a count with neither its reset nor its limit gives no rate:
        if f"x-ratelimit-reset-{kind}" not in out and f"x-ratelimit-limit-{kind}" not in out:
            out.pop(f"x-ratelimit-remaining-{kind}", None)  # "0 left" alone would stall the endpoint
    return out


def _float(value: str | None) -> float | None:
    try:
        n = float(value) if value is not None else None
    except (ValueError, OverflowError):
        return None
    return None if n is None or math.isnan(n) else n


# -- error bodies ----------------------------------------------------------------------------


class _ErrorDetail(msgspec.Struct):
    message: str | None = None
    type: str | None = None
    status: str | None = None  # gemini: "INVALID_ARGUMENT"


class _ErrorBody(msgspec.Struct):
    """OpenAI ``{error: {message, type}}``, Anthropic ``{type: "error", error: {type, message}}``
    and Gemini ``{error: {code, message, status}}`` all share this view; some servers send
    ``{error: "text"}`` or ``{message: "text"}``."""

    error: _ErrorDetail | str | None = None
    message: str | None = None
    detail: str | None = None


_error_decoder = msgspec.json.Decoder(_ErrorBody)
_MAX_MESSAGE = 300


def error_message(body: bytes, api_key: str | Sequence[str] | None = None) -> str:
    """The server's own words for an error response, short and with any key masked."""
    text = ""
    try:
        err = _error_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        text = body[:_MAX_MESSAGE].decode("utf-8", "replace").strip()
    else:
        if isinstance(err.error, _ErrorDetail):
            text = err.error.message or err.error.type or err.error.status or ""
        elif isinstance(err.error, str):
            text = err.error
        text = text or err.message or err.detail or ""
    text = one_line(text, _MAX_MESSAGE)  # a server's control bytes never reach a terminal
    return redact(text, api_key) if text.strip() else "(empty body)"


# Key shapes masked even when we do not hold the key (e.g. a server echoing another one):
# OpenAI/Anthropic "sk-...", Google "AIza...", and "Bearer <token>".
_KEY_SHAPES = re.compile(r"(sk-[A-Za-z0-9_\-]{4,}|AIza[0-9A-Za-z_\-]{10,}|(?<=Bearer )[^\s\"']{6,})")


def redact(text: str, api_key: str | Sequence[str] | None = None) -> str:
    """Mask ``api_key`` (one key, or every key of a pool) and anything shaped like an API key."""
    for key in (api_key,) if isinstance(api_key, str) else api_key or ():
        if key and key in text:
            text = text.replace(key, "***")
        if key and len(key) >= 12:  # servers often echo a prefix or suffix of the key
            for part in (key[:10], key[-8:]):
                text = text.replace(part, "***")
    return _KEY_SHAPES.sub("***", text)


def normalise_finish(reason: str | None, table: dict[str, str]) -> str | None:
    """Map a protocol's stop reason onto OpenAI's vocabulary (stop, length, content_filter...)."""
    if reason is None:
        return None
    return table.get(reason, reason.lower())
