"""The simulator's hidden limits: a token bucket, fixed or sliding windows, and OpenAI's
``x-ratelimit-*`` duration format. ``limit_shape`` picks one per model, key or organisation;
a ``Quota`` is one holder's pair (requests and tokens a minute) and ``admit`` checks several in
order, taking from all of them or from none."""

from __future__ import annotations

import time
from collections import deque
from typing import Protocol


class Bucket:
    """A token bucket refilled continuously: ``per_minute`` units a minute, holding at most
    ``burst_s`` seconds' worth. This is how most providers enforce RPM/TPM; the level may go
    negative when a request used more tokens than it declared."""

    __slots__ = ("capacity", "level", "limit", "rate", "stamp")

    def __init__(self, per_minute: float, burst_s: float):
        self.limit = per_minute
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate * burst_s)
        self.level = self.capacity
        self.stamp = time.monotonic()

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait_s(self, amount: float, now: float) -> float:
        """Seconds until ``amount`` units are available (0 when they are now)."""
        self.refill(now)
        need = min(amount, self.capacity) - self.level
        return max(0.0, need / self.rate)

    def take(self, amount: float) -> None:
        self.level -= amount

    def remaining(self) -> float:
        return self.level

    def reset_s(self, now: float) -> float:
        """Seconds until the bucket is full again (``x-ratelimit-reset-*``)."""
        return max(0.0, (self.capacity - self.level) / self.rate)

    def headers(self, kind: str, into: dict[str, str], now: float) -> None:
        into[f"x-ratelimit-limit-{kind}"] = str(int(self.limit))
        into[f"x-ratelimit-remaining-{kind}"] = str(max(0, int(self.remaining())))
        into[f"x-ratelimit-reset-{kind}"] = fmt_duration(self.reset_s(now))


class Window(Bucket):
    """``per_minute`` units per ``window_s`` window of what was let through: *fixed* windows
    (back to back from ``start``, the whole budget back at each boundary) or a *sliding* one (the
    last ``window_s`` seconds, counted in bins of a hundredth of the window)."""

    __slots__ = ("bins", "sliding", "start", "used", "window")

    def __init__(self, per_minute: float, window_s: float, sliding: bool):
        self.limit = per_minute
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, per_minute * window_s / 60.0)
        self.window = window_s
        self.sliding = sliding
        self.start = time.monotonic()
        self.used = 0.0
        self.bins: deque[list[float]] = deque()  # sliding: [bin start, units]

    def refill(self, now: float) -> None:
        if self.sliding:
            while self.bins and self.bins[0][0] + self.window <= now:
                self.used -= self.bins.popleft()[1]
        elif now >= self.start + self.window:
            self.start = now - (now - self.start) % self.window
            self.used = 0.0

    def wait_s(self, amount: float, now: float) -> float:
        self.refill(now)
        need = min(amount, self.capacity)
        if self.used + need <= self.capacity:
            return 0.0
        if not self.sliding:
            return self.start + self.window - now
        freed = self.capacity - self.used
        for t, units in self.bins:  # the oldest bins leave first
            freed += units
            if freed >= need:
                return max(0.0, t + self.window - now)
        return self.window

    def take(self, amount: float) -> None:
        self.used += amount
        if self.sliding:
            now = time.monotonic()
            step = self.window / 100
            start = now - now % step
            if self.bins and self.bins[-1][0] == start:
                self.bins[-1][1] += amount
            else:
                self.bins.append([start, amount])

    def remaining(self) -> float:
        return self.capacity - self.used

    def reset_s(self, now: float) -> float:
        if not self.sliding:
            return max(0.0, self.start + self.window - now)
        return max(0.0, self.bins[-1][0] + self.window - now) if self.bins else 0.0


class LimitSpec(Protocol):
    """What shapes a limit (a model's, a key's or an organisation's profile has these)."""

    @property
    def limit_shape(self) -> str: ...
    @property
    def limit_burst_s(self) -> float: ...
    @property
    def limit_window_s(self) -> float: ...


def make_limit(per_minute: float | None, p: LimitSpec) -> Bucket | None:
    """The hidden limit of ``per_minute`` units in the profile's shape (None: unlimited)."""
    if not per_minute:
        return None
    if p.limit_shape == "bucket":
        return Bucket(per_minute, p.limit_burst_s)
    return Window(per_minute, p.limit_window_s, sliding=p.limit_shape == "sliding_window")


def fmt_duration(seconds: float) -> str:
    """OpenAI's duration format: ``20ms``, ``1.2s``, ``6m0s``."""
    if seconds < 1.0:
        return f"{max(0, round(seconds * 1000))}ms"
    if seconds < 60.0:
        return f"{seconds:.2f}".rstrip("0").rstrip(".") + "s"
    minutes, rest = divmod(seconds, 60.0)
    return f"{int(minutes)}m{int(rest)}s"


class Quota:
    """The hidden limits of one holder (a key, an organisation, a model): requests and tokens a
    minute, ``visible`` when its replies carry ``x-ratelimit-*`` (else a 429 says only
    ``Retry-After: 1``). ``name`` is what a 429 message calls it."""

    __slots__ = ("name", "requests", "rpm", "spec", "tokens", "tpm", "visible")

    def __init__(self, name: str, rpm: float | None, tpm: float | None, spec: LimitSpec, visible: bool):
        self.name = name
        self.rpm, self.tpm, self.spec, self.visible = rpm, tpm, spec, visible
        self.requests: Bucket | None = make_limit(rpm, spec)
        self.tokens: Bucket | None = make_limit(tpm, spec)

    @property
    def limited(self) -> bool:
        return self.requests is not None or self.tokens is not None

    def reset(self) -> None:
        """Full again (``/reset``)."""
        self.requests = make_limit(self.rpm, self.spec)
        self.tokens = make_limit(self.tpm, self.spec)

    def short(self, declared: float, now: float) -> tuple[str, float] | None:
        """("requests" | "tokens", seconds to wait) when one request of ``declared`` tokens does
        not fit now, else None."""
        if self.requests is not None and (wait := self.requests.wait_s(1.0, now)) > 0:
            return "requests", wait
        if self.tokens is not None and (wait := self.tokens.wait_s(declared, now)) > 0:
            return "tokens", wait
        return None

    def take(self, declared: float) -> None:
        if self.requests is not None:
            self.requests.take(1.0)
        if self.tokens is not None:
            self.tokens.take(declared)

    def settle(self, tokens: float) -> None:
        """Tokens used beyond what the request declared (a reply with no token limit)."""
        if self.tokens is not None:
            self.tokens.take(tokens)

    def headers(self, now: float) -> dict[str, str]:
        """The ``x-ratelimit-*`` headers of this limit ({} when hidden)."""
        out: dict[str, str] = {}
        if self.visible:
            if self.requests is not None:
                self.requests.headers("requests", out, now)
            if self.tokens is not None:
                self.tokens.headers("tokens", out, now)
        return out


def admit(quotas: list[Quota], declared: float, now: float) -> tuple[Quota, str, float] | None:
    """Check ``quotas`` in order: the first one short refuses (quota, kind, wait) and nothing is
    taken from any; else one request of ``declared`` tokens is taken from each (None)."""
    for q in quotas:
        if (short := q.short(declared, now)) is not None:
            return q, *short
    for q in quotas:
        q.take(declared)
    return None
