"""The rate-limit headers admission reads, by name, and their typed reading.

Every wire's ``Provider.limits`` maps its own headers onto OpenAI's names (``x-ratelimit-*``,
``retry-after``, ``retry-after-ms``), made safe by ``sane_limits``; admission
(``engine.request.admission``) reads them only through this module, so a header name is
spelled in ``providers/`` and nowhere else.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from fairdistill.engine.request import durations

REMAINING = {"requests": "x-ratelimit-remaining-requests", "tokens": "x-ratelimit-remaining-tokens"}
RESET = {"requests": "x-ratelimit-reset-requests", "tokens": "x-ratelimit-reset-tokens"}
LIMIT = {"requests": "x-ratelimit-limit-requests", "tokens": "x-ratelimit-limit-tokens"}
RETRY_AFTER = "retry-after"
RETRY_AFTER_MS = "retry-after-ms"
_REMAINING_REQUESTS, _REMAINING_TOKENS = REMAINING["requests"], REMAINING["tokens"]


@dataclass(frozen=True, slots=True)
class ServerLimit:
    """What a reply said of one server-side limit (requests or tokens)."""

    remaining: float
    reset_s: float | None  # time until the limit is full again (OpenAI) / resets
    limit: float | None  # the limit per minute, when the server states it


def number(value: str | None) -> float | None:
    """A finite, non-negative count; None when absent or unreadable."""
    if value is None:
        return None
    try:
        n = float(value)
    except ValueError:
        return None
    return n if math.isfinite(n) and n >= 0 else None


def has_limits(headers: Mapping[str, str]) -> bool:
    """Whether the reply carries a ``remaining`` count (the server mirror has something to learn)."""
    return _REMAINING_REQUESTS in headers or _REMAINING_TOKENS in headers


def server_limit(headers: Mapping[str, str], kind: Literal["requests", "tokens"]) -> ServerLimit | None:
    """The reply's word on the ``kind`` limit, or None when it states no ``remaining``."""
    remaining = number(headers.get(REMAINING[kind]))
    if remaining is None:
        return None
    reset = durations.reset_duration(headers.get(RESET[kind]))
    return ServerLimit(remaining, reset, number(headers.get(LIMIT[kind])))


def retry_after_s(headers: Mapping[str, str]) -> float | None:
    """The pause a 429 asked for: ``retry-after-ms`` (OpenAI, Azure) is precise, ``Retry-After``
    whole seconds or an HTTP date; None when neither is usable (the engine's default applies)."""
    ms = durations.delay_seconds(headers.get(RETRY_AFTER_MS))
    seconds = ms / 1000 if ms is not None else durations.retry_after(headers.get(RETRY_AFTER))
    if seconds is not None and not math.isfinite(seconds):
        return None  # (a provider's limits() clamps first; unclamped inf is no pause)
    return seconds
