"""Server-given durations, read one way: ``Retry-After``, ``retry-after-ms``, ``x-ratelimit-reset-*``
and Anthropic's RFC 3339 reset times.

A valid value is a pause the server asks for: a huge valid one is clamped by the caller
(``max_wait_s``). Anything that is not a valid duration (``inf``, ``nan``, a negative number,
``1e308``, text) is *ignored* (None), as if the header were absent, so the engine's own backoff
applies. Clamping such a value instead would turn ``Retry-After: inf`` into the longest pause
allowed: a run that looks hung.

    delay_seconds("1.5")               -> 1.5     decimal seconds: digits, an optional fraction
    retry_after("Wed, 21 Oct 2015 07:28:00 GMT") -> seconds from now (0 if past)
    reset_duration("6m0s")             -> 360.0   OpenAI's reset durations (or plain seconds)
    until_rfc3339("2025-08-21T12:40:59Z") -> seconds from now (0 if past)
"""

from __future__ import annotations

import email.utils
import math
import re
import time
from datetime import datetime

_DECIMAL = re.compile(r"\d+(?:\.\d+)?")  # RFC 9110 delta-seconds, plus a fraction some servers send
_GO_DURATION = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|h|m|s))+")
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def delay_seconds(value: str | None) -> float | None:
    """Plain non-negative seconds (``"3"``, ``"0.25"``); a too-long digit string is huge, not
    invalid. None for anything else (``inf``, ``nan``, ``-5``, ``1e3``, ``soon``)."""
    if value is None:
        return None
    value = value.strip()
    if not _DECIMAL.fullmatch(value):
        return None
    try:
        seconds = float(value)
    except OverflowError:  # (float() of a long digit string gives inf, but be sure)
        return math.inf
    return seconds  # may be inf for 400 digits: valid, and the caller clamps it


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` (RFC 9110 10.2.3): delay-seconds or an HTTP date; None when neither."""
    if value is None:
        return None
    seconds = delay_seconds(value)
    if seconds is not None:
        return seconds
    try:
        when = email.utils.parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    try:
        stamp = when.timestamp()
    except (OverflowError, OSError, ValueError):
        return None
    return max(0.0, stamp - (time.time() if now is None else now))


def reset_duration(value: str | None) -> float | None:
    """OpenAI's ``x-ratelimit-reset-*``: ``"1s"``, ``"6m0s"``, ``"20ms"``, ``"1h2m3.5s"``, or
    plain seconds (``"0.5"``); None when unreadable."""
    if value is None:
        return None
    value = value.strip()
    seconds = delay_seconds(value)
    if seconds is not None or not _GO_DURATION.fullmatch(value):
        return seconds
    return sum(float(n) * _UNIT_S[unit] for n, unit in _PART.findall(value))


def until_rfc3339(stamp: str | None, now: float | None = None) -> float | None:
    """An RFC 3339 time (``2025-08-21T12:40:59Z``) as seconds from ``now``; None if unreadable."""
    if not stamp:
        return None
    try:
        when = datetime.fromisoformat(stamp.strip()).timestamp()
    except (ValueError, OverflowError, OSError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


def clamp(seconds: float | None, ceiling: float) -> float | None:
    """A valid pause limited to ``[0, ceiling]``; None stays None (ignored)."""
    return None if seconds is None else min(max(seconds, 0.0), ceiling)
