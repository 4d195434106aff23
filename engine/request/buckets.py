"""A reservation token bucket, the pacing part of admission (``engine.request.admission``).

``reserve`` takes the tokens at once (the level may go negative) and returns how long the caller
must sleep for the debt to be repaid: callers are served in order, each sleeps once, nothing
polls. Places are tickets on the running count of everything reserved, so a waiter asks again
when the rate changes (``due``) and is not stuck behind a pace that has since risen.
"""

from __future__ import annotations

import time


class TokenBucket:
    """A reservation token bucket: ``reserve`` takes the tokens at once (the level may go
    negative) and returns how long the caller must sleep for the debt to be repaid. Callers are
    served in order, each sleeps once, nothing polls. ``capacity`` bounds the burst."""

    __slots__ = ("capacity", "level", "rate", "taken", "updated")

    def __init__(self, rate: float, capacity: float | None = None):
        self.rate = rate
        self.capacity = capacity if capacity is not None else max(1.0, rate)  # one second's worth
        self.level = self.capacity
        self.taken = 0.0  # everything ever reserved: a place in line is a ticket on this count
        self.updated = time.monotonic()

    def _refill(self, now: float) -> None:
        if now > self.updated:
            self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
            self.updated = now

    def take(self, cost: float, now: float) -> float:
        """Take a place in line; returns its ticket (for ``due``)."""
        self._refill(now)
        cost = min(cost, self.capacity)  # a request larger than the burst must still pass
        self.level -= cost
        self.taken += cost
        return self.taken

    def due(self, ticket: float, now: float) -> float:
        """Seconds until the place ``ticket`` is paid for at the *current* rate: a waiter asks
        again when the rate changes, so a place taken while the rate was low is not stuck there."""
        self._refill(now)
        short = ticket - (self.taken + self.level)  # taken + level: everything ever paid in
        held = max(0.0, self.updated - now)  # during a pause, refill starts when it ends
        return held + (short / self.rate if short > 0 else 0.0)

    def reserve(self, cost: float, now: float) -> float:
        """Take a place; seconds until it is due at the current rate."""
        return self.due(self.take(cost, now), now)

    def adjust(self, delta: float) -> None:
        """Give back (delta > 0) or take more (delta < 0) after the real cost is known."""
        self.level = min(self.capacity, self.level + delta)

    def set_rate(self, rate: float, now: float) -> None:
        self._refill(now)
        self.rate = rate
        self.capacity = max(1.0, rate)

    def hold(self, now: float, until: float) -> None:
        """A pause: no refill until ``until``, and what was left is spent (the server said so).
        Debts are kept, so every queued reservation moves back by the pause, in order."""
        self._refill(now)
        self.level = min(self.level, 0.0)
        self.updated = max(self.updated, until)
