"""The retry boundary: a failed attempt worth retrying is tried again, with backoff.

``retrying(policy, attempt, *args, on_retry=...)`` awaits ``attempt(*args)``; when it raises
``Transient`` (5xx, 408, connection reset, timeout, unusable 2xx body) it is tried again, with
exponential backoff and full jitter (U(0, base), U(0, 2 base), U(0, 4 base)... capped at
``max_s``), at most ``policy.max_attempts`` attempts in all; then the last ``Transient`` is
raised. Anything else (a 4xx, refused credentials, cancellation) passes straight through.
429s never get here: admission handles them (``engine.request.admission``).

The first attempt runs outside tenacity: its ``AsyncRetrying`` object costs ~35 us per call,
which is 15 % of a core at 5,000 calls/s; only a call that has already failed enters it.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_random_exponential

T = TypeVar("T")

BACKOFF_BASE_S = 0.5  # first retry waits U(0, base), then U(0, 2 base), U(0, 4 base)...
BACKOFF_MAX_S = 20.0


class Transient(Exception):
    """An attempt failed in a way worth retrying (``status`` 0: no HTTP reply)."""

    def __init__(self, message: str, status: int = 0, reply_error: bool = False):
        super().__init__(message)
        self.status = status
        self.reply_error = reply_error  # a 2xx whose body could not be used


class RetryPolicy:
    """How often and how patiently one endpoint's calls are retried."""

    __slots__ = ("base_s", "max_attempts", "max_s")

    def __init__(self, max_attempts: int, base_s: float = BACKOFF_BASE_S, max_s: float = BACKOFF_MAX_S):
        self.max_attempts = max_attempts
        self.base_s = base_s
        self.max_s = max_s

    def __repr__(self) -> str:
        return f"RetryPolicy(max_attempts={self.max_attempts}, base_s={self.base_s}, max_s={self.max_s})"


async def retrying(
    policy: RetryPolicy,
    attempt: Callable[..., Awaitable[T]],
    *args: Any,
    on_retry: Callable[..., None] | None = None,
) -> T:
    """``await attempt(*args)``, retried on ``Transient``; ``on_retry(*args)`` before each retry."""
    try:
        return await attempt(*args)
    except Transient:
        if policy.max_attempts <= 1:
            raise
    await asyncio.sleep(random.uniform(0, policy.base_s))
    retries = AsyncRetrying(
        stop=stop_after_attempt(policy.max_attempts - 1),
        wait=wait_random_exponential(multiplier=2 * policy.base_s, max=policy.max_s),
        retry=retry_if_exception_type(Transient),
        reraise=True,
    )
    async for tried in retries:
        with tried:
            if on_retry is not None:
                on_retry(*args)
            return await attempt(*args)
    raise AssertionError("unreachable: tenacity reraises the last Transient")
