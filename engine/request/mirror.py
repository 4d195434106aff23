"""The server mirror of admission: a model of a server's hidden limit built from its
``x-ratelimit-*`` headers (read through ``engine.request.providers.ratelimit``).

``LimitMirror`` is one limit (requests or tokens); ``Units`` are our running counts of its
units; a ``Lease`` is one admitted call with what had been sent and accepted before it, which is
what the server had counted when it answered (``counted``). Measured against the simulator:
96-100 % of a hidden RPM with 0-0.4 % of calls answered 429.
"""

from __future__ import annotations

from collections import deque


class LimitMirror:
    """A model of one server-side limit (requests or tokens) built from ``x-ratelimit-*``.

    In units of that limit: the server's *allowance* is everything it ever let through plus what
    it has left; a bucket only ever adds to it (its refill). A reply to call p says ``remaining``
    as of p's arrival, when the server had counted the calls sent before p that it did not refuse
    (``counted``), plus p itself; their sum is the allowance at p's send time. Its
    slope over time is the hidden rate (when no ``x-ratelimit-limit-*`` header states it); the
    anchor is the best recent estimate, projected forward at that rate. A new call may go when
    the projected allowance covers everything we sent that the server may count (all calls but
    those it refused) plus one unit of margin.
    """

    BIN_S = 0.25  # observations are kept per bin (max allowance), so the cost stays O(1)
    WINDOW_S = 6.0  # slope measured over up to this much history
    MIN_SPAN_S = 1.0

    __slots__ = ("anchor", "anchor_t", "bins", "capacity", "exact", "guess", "rate")

    def __init__(self) -> None:
        self.anchor: float | None = None  # allowance (estimated) at anchor_t
        self.anchor_t = 0.0
        self.rate: float | None = None  # learned refill per second (slope)
        self.guess: float | None = None  # rate from limit/reset headers, until a slope is known
        self.capacity = 0.0  # largest "remaining" seen (+1): the server's burst
        self.exact = False  # the server states its limit: limit/period is the rate, no guessing
        self.bins: deque[list[float]] = deque()  # [bin_start, max_allowance, t_of_max, max_remaining]

    @property
    def pace(self) -> float | None:
        return self.guess if self.exact else self.rate or self.guess

    def observe(
        self,
        remaining: float,
        counted: float,
        t: float,
        reset_s: float | None,
        limit: float | None,
        period_s: float,
        rejected: bool = False,
    ) -> None:
        """Learn from one reply: ``counted`` is what the server had surely counted of ours;
        ``rejected``: the reply was a 429, so the allowance is used up whatever we projected."""
        allowance = remaining + counted
        self.capacity = max(self.capacity, remaining + 1)
        if limit:
            self.guess = limit / period_s
            self.exact = True
        elif reset_s and self.capacity > remaining:
            self.guess = (self.capacity - remaining) / reset_s  # OpenAI: reset = time to full
        elif self.guess is None:
            self.guess = self.capacity / period_s
        if rejected:  # trust the server over the projection
            self.anchor, self.anchor_t = allowance, t
            if self.rate and not self.exact:
                self.rate *= 0.97  # the projection ran ahead: the slope was a little high
            return
        pace = self.pace or 0.0
        if self.anchor is None or allowance >= self.anchor + pace * (t - self.anchor_t):
            self.anchor, self.anchor_t = allowance, t
        if self.exact:
            return
        # slope, from per-bin maxima while the server bucket is not full (its refill is capped)
        start = t - t % self.BIN_S
        bins = self.bins
        if bins and bins[-1][0] == start:
            b = bins[-1]
            if allowance > b[1]:
                b[1], b[2] = allowance, t
            b[3] = max(b[3], remaining)
        else:
            bins.append([start, allowance, t, remaining])
            while bins and bins[0][0] < t - self.WINDOW_S:
                bins.popleft()
            self._update_rate()

    def _update_rate(self) -> None:
        bins = self.bins
        if len(bins) < 3:
            return
        last = bins[-2]  # the newest complete bin
        if last[3] >= 0.5 * self.capacity:
            return  # not constrained: the server may be capping its refill
        for first in bins:
            if last[2] - first[2] < self.MIN_SPAN_S:
                return
            if first[3] < 0.5 * self.capacity:
                slope = (last[1] - first[1]) / (last[2] - first[2])
                if slope > 0:
                    self.rate = slope
                return

    def delay(self, committed: float, accepted: float, now: float) -> float:
        """Seconds until the allowance covers ``committed`` units (ours the server may count).

        The projection cannot run more than a full bucket past what the server has counted
        (``accepted``: everything sent and not refused): while its bucket is full (we were idle)
        the refill is lost, not banked."""
        if self.anchor is None:
            return 0.0
        pace = self.pace
        available = self.anchor + (pace or 0.0) * (now - self.anchor_t)
        full = accepted + self.capacity + 1.0  # (+1: the margin below must not shrink the bucket;
        # a server whose bucket holds one call would otherwise never be sent another)
        if available > full:
            self.anchor, self.anchor_t, available = full, now, full
        short = committed + 1.0 - available  # one unit of margin
        if short <= 0:
            return 0.0
        return short / pace if pace else 1.0


class Units:
    """Running counts of one limit's units (requests or tokens) for the server mirror."""

    __slots__ = ("accepted", "refused", "reserved", "sent")

    def __init__(self) -> None:
        self.reserved = 0.0  # taken by calls admitted or waiting to be
        self.sent = 0.0  # of calls admitted (sent)
        self.accepted = 0.0  # of calls the server answered other than with a 429 (it counted them)
        self.refused = 0.0  # of calls answered 429 (the server did not count them)


class Lease:
    """One admitted call: its cost, the cut epoch it saw, and what had been sent and accepted
    before it was sent."""

    __slots__ = ("acc_req", "acc_tok", "epoch", "est_tokens", "sent_req", "sent_tok", "t")

    def __init__(self, est_tokens: float, epoch: int, req: Units, tok: Units, t: float = 0.0):
        self.est_tokens = est_tokens
        self.epoch = epoch
        self.acc_req, self.sent_req = req.accepted, req.sent
        self.acc_tok, self.sent_tok = tok.accepted, tok.sent
        self.t = t  # when it was admitted (0.0 on the ungated fast path, where nobody needs it)
        req.sent += 1.0
        tok.sent += est_tokens


def counted(accepted: float, sent: float, refused: float) -> float:
    """What the server had counted of ours when a call reached it: every call sent before,
    less those it refused. Providers count a call on arrival and transit takes milliseconds
    against seconds of generation, so calls sent earlier arrived earlier. (Counting only the
    calls already *answered* would miss every call in flight: with 1 s latency that is a
    second's worth of the limit, the server's whole burst, never used.) Never less than what
    had been answered when the call was sent, which is certain."""
    return max(accepted, sent - refused)
