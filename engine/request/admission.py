"""Per-endpoint admission: a concurrency cap, RPM/TPM buckets, and adaptation to the server.

Every call takes a ``Lease`` before it is sent and gives it back with its outcome::

    lease = await admission.acquire(est_tokens)     # may wait: cap, buckets, pause, server mirror
    ...send...
    admission.release(lease, status, headers, used_tokens)

The parts, each readable alone: the buckets (``engine.request.buckets.TokenBucket``), the server
mirror (``engine.request.mirror``: ``LimitMirror``, ``Units``, ``Lease``), the headers read
through ``engine.request.providers.ratelimit`` (their names are spelled there only), blind AIMD
and probing (``engine.request.pacer.Pacer``), the adaptation's constants in one frozen value
(``engine.request.tunables.Tunables``), and here the gates and the typed outcome of a release
(``Released``, read by the one status table ``engine.request.providers.status``).

Five gates, each skipped when it has nothing to say (an endpoint with no limits and a server
that sends no rate-limit headers costs one semaphore acquire per call once it has answered):

1. **Concurrency cap**: an ``asyncio.Semaphore`` of ``EndpointConfig.concurrency``.
2. **Cold start**: until the endpoint first answers, 32 calls go at once and the window then
   doubles every 50 ms, so a server whose hidden limit is below the concurrency is not hit by
   a wall of calls before its first 429 (or header) can tell us so.
3. **Configured RPM / TPM**: token buckets (``TokenBucket``). Tokens are estimated before the
   call (``chars/4`` + 3 per message + ``max_tokens``) and reconciled with ``usage`` after.
4. **Pause**: a 429's ``retry-after-ms`` / ``Retry-After`` pauses the whole endpoint until then.
   The buckets stop refilling meanwhile and every queued reservation moves back by the pause, so
   a pause neither ends in a burst nor reorders the queue (the mirror below relies on its order).
5. **Server mirror** (``LimitMirror``): when a server sends ``x-ratelimit-remaining-*`` (with
   ``-reset-*``, ``-limit-*``), we keep a model of its bucket: an estimate of its *allowance*
   (what it let through plus what remains), which only grows by its refill, so its slope *is*
   the hidden rate when no ``-limit-*`` header states it. Calls go while what we sent stays
   under the projected allowance, and are paced at that rate once it would not. Measured
   against the simulator: 96-100 % of a hidden RPM with 0-0.4 % of calls answered 429.

Without any headers the adaptation is blind AIMD with probing (``engine.request.pacer``): a
429 cuts the rate to what the server accepted, success creeps it back, and a window or quota
that refuses everything (issue 11's collapse) is probed rather than cut. Places in the request
bucket are tickets on its running count, not fixed times, so a waiter recomputes when it is due
as soon as the pace rises. Measured without any header against the simulator
(`fair bench throughput --regimes shapes`): token buckets of 1 s and 60 s, fixed and sliding
one-minute windows of 3,000 rpm all finish within 1.02-1.09x of their ideal time, < 1 % 429s.

Why not ``asyncio-throttle``: its ``Throttler`` polls (every waiter wakes every 10 ms, so 512
waiting calls cost ~50k wake-ups a second), takes integer unit costs only (TPM needs weighted
acquires) and cannot change its rate while running (AIMD needs that). ``TokenBucket`` is a
reservation bucket instead: O(1) per call, FIFO, one sleep per waiter, no polling.
"""

from __future__ import annotations

import asyncio
import enum
import math
import time
from collections.abc import Mapping

from fairdistill.engine.request import durations
from fairdistill.engine.request.buckets import TokenBucket
from fairdistill.engine.request.mirror import Lease, LimitMirror, Units, counted
from fairdistill.engine.request.pacer import Pacer
from fairdistill.engine.request.providers.ratelimit import has_limits, retry_after_s, server_limit
from fairdistill.engine.request.providers.status import Verdict, classify
from fairdistill.engine.request.tunables import TUNABLES, Tunables


class Released(enum.Enum):
    """What admission learns from one released call."""

    NO_ANSWER = 0  # no HTTP reply (reset, timeout): the server may have counted it
    OK = 1  # a 2xx: the pace was fine
    THROTTLED = 2  # a 429: the server refused it (and did not count it)
    OTHER = 3  # another answer (a 4xx, a 5xx): counted, says nothing of the pace


def released(status: int) -> Released:
    """The admission outcome of an HTTP status, by ``engine.request.providers.status``."""
    if not status:
        return Released.NO_ANSWER
    if 200 <= status < 300:
        return Released.OK
    return Released.THROTTLED if classify(status) is Verdict.ADMISSION else Released.OTHER


# -- header parsing ---------------------------------------------------------------------------


def parse_duration(value: str | None) -> float | None:
    """``x-ratelimit-reset-*`` as seconds (``engine.request.durations``); None when unreadable."""
    return durations.reset_duration(value)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds: delta-seconds or an HTTP date; None when neither (ignored)."""
    return durations.retry_after(value, now)


class ColdStart:
    """Gate 2: until the endpoint first answers, ``tune.cold_window`` calls go at once and the
    window then doubles every ``tune.cold_doubling_s`` (continuously); the first answer ends it."""

    __slots__ = ("active", "sent", "t0", "tune", "warm")

    def __init__(self, active: bool, tune: Tunables):
        self.active = active
        self.tune = tune
        self.sent = 0
        self.t0: float | None = None
        self.warm = asyncio.Event()  # set by the first answer: the calls waiting in the window go

    def delay(self, now: float) -> float:
        """Take the next place in the growing window; seconds until it opens."""
        if self.t0 is None:
            self.t0 = now
        self.sent += 1
        t = self.tune
        if self.sent <= t.cold_window:
            return 0.0
        return max(0.0, self.t0 + t.cold_doubling_s * math.log2(self.sent / t.cold_window) - now)

    def end(self) -> None:
        self.active = False
        self.warm.set()


class Admission:
    """Admission control of one endpoint. See the module docstring for the gates. ``rate``,
    ``pace``, ``epoch``, ``blocked``, ``knee`` and ``ceiling`` are the pacer's (read here)."""

    rate = property(lambda self: self.pacer.rate)
    pace = property(lambda self: self.pacer.pace)
    epoch = property(lambda self: self.pacer.epoch)
    blocked = property(lambda self: self.pacer.blocked)
    knee = property(lambda self: self.pacer.knee)
    ceiling = property(lambda self: self.pacer.ceiling)

    def __init__(
        self, concurrency: int, rpm: float | None = None, tpm: float | None = None, tune: Tunables = TUNABLES
    ):
        self.concurrency = concurrency
        self.tune = tune
        self._sem = asyncio.Semaphore(concurrency)
        ceiling = rpm / 60 if rpm else None  # configured req/s, never exceeded
        self.requests = TokenBucket(ceiling) if ceiling else None
        self.tokens = TokenBucket(tpm / 60, capacity=max(tpm / 60, 1.0)) if tpm else None
        self.pacer = Pacer(ceiling, tune, self)  # blind AIMD and probing (engine.request.pacer)
        self.req = Units()
        self.tok = Units()
        self.paused_until = 0.0
        self._wake: asyncio.Event | None = None  # set when the pace rises: waiters recompute
        self.mirror_req: LimitMirror | None = None
        self.mirror_tok: LimitMirror | None = None
        # Cold start: nothing is known about the server's limits until it first answers. Rather
        # than firing `concurrency` calls at once (a 429 flood where the hidden limit is lower),
        # ``tune.cold_window`` calls go at once and the allowance then doubles every ``tune.cold_doubling_s``,
        # smoothly; the first answer ends it (a 429 comes back in milliseconds, so at most a few
        # calls overshoot a low limit, while a slow server without limits loses ~0.15 s).
        self.cold = ColdStart(ceiling is None, tune)
        self._gated = self.cold.active or self.requests is not None or self.tokens is not None

    # -- acquire ----------------------------------------------------------------------------
    async def acquire(self, est_tokens: float = 0.0, affinity: int = 0) -> Lease:
        """A lease for one call (``affinity`` is a key pool's: one key has nothing to choose)."""
        await self._sem.acquire()
        if not self._gated:
            self.req.reserved += 1.0
            self.tok.reserved += est_tokens
            return Lease(est_tokens, self.pacer.epoch, self.req, self.tok)
        try:
            return await self._wait(est_tokens)
        except BaseException:
            self._sem.release()
            raise

    async def _wait(self, est_tokens: float) -> Lease:
        req, tok = self.req, self.tok
        placed = False  # has this call had its place in the cold-start window?
        index_req = index_tok = -1.0  # its place in the mirrors' order (fixed once taken)
        b_req = b_tok = None  # the buckets it holds a place (ticket) in, once taken
        t_req = t_tok = 0.0
        while True:
            now = time.monotonic()
            unplaced = b_req is None and b_tok is None
            if unplaced and self.paused_until > now and self.requests is None and self.tokens is None:
                await asyncio.sleep(self.paused_until - now)  # (a bucket place accounts for it)
                continue
            if self.cold.active and not placed:
                placed = True
                delay = self.cold.delay(now)
                if delay > 0:  # sleep until our place in the window opens, or the first answer
                    await self._sleep(delay, self.cold.warm)
                    continue
            if index_req < 0:
                req.reserved += 1.0
                tok.reserved += est_tokens
                index_req, index_tok = req.reserved, tok.reserved
            if b_req is None and b_tok is None and (self.requests is not None or self.tokens is not None):
                b_req, b_tok = self.requests, self.tokens  # take places in the buckets, once
                if b_req is not None:
                    t_req = b_req.take(1.0, now)
                if b_tok is not None:
                    t_tok = b_tok.take(est_tokens, now)
            # due at the buckets' current pace: pauses move the queue back, a rising pace forward
            delay = b_req.due(t_req, now) if b_req is not None and b_req is self.requests else 0.0
            if b_tok is not None:
                delay = max(delay, b_tok.due(t_tok, now))
            if delay > 0:
                if self._wake is None:
                    self._wake = asyncio.Event()
                await self._sleep(delay, self._wake)
                continue
            # the server mirrors: our place, less what the server refused, must fit its allowance
            if self.mirror_req is not None:
                delay = self.mirror_req.delay(index_req - req.refused, req.sent - req.refused, now)
            if self.mirror_tok is not None:
                delay = max(
                    delay, self.mirror_tok.delay(index_tok - tok.refused, tok.sent - tok.refused, now)
                )
            if delay > 0:
                await asyncio.sleep(delay)
                continue
            return Lease(est_tokens, self.pacer.epoch, req, tok, now)

    @staticmethod
    async def _sleep(delay: float, wake: asyncio.Event) -> None:
        """Sleep ``delay`` seconds, or until ``wake`` is set."""
        try:
            async with asyncio.timeout(delay):
                await wake.wait()
        except TimeoutError:
            pass

    @property
    def ungated(self) -> bool:
        """Nothing but the concurrency cap is in force: warm, no bucket, no mirror, no pause (a
        shared limiter may then lend leases without asking again: ``engine.scale.limiter``)."""
        return not self._gated and self.paused_until <= time.monotonic()

    def absorb(self, n: int) -> None:
        """Count ``n`` plain 2xx outcomes of calls that ran on lent leases, as ``release`` would
        have (what the server accepted since the last cut measures the next cut). Only for an
        ungated admission, where ``release`` counts nothing else for a 2xx."""
        self.req.accepted += n
        self.pacer.absorb(n)

    # -- release ----------------------------------------------------------------------------
    def release(
        self,
        lease: Lease,
        status: int,
        headers: Mapping[str, str] | None = None,
        used_tokens: float | None = None,
    ) -> None:
        """Give the slot back and learn from the outcome (status 0: no HTTP answer), read as a
        ``Released`` by the one status table."""
        self._sem.release()
        outcome = released(status)
        est = lease.est_tokens
        if outcome is Released.THROTTLED:
            self.req.refused += 1.0
            self.tok.refused += est
        else:  # answered, or no answer at all (then assume the server counted it)
            self.req.accepted += 1.0
            self.tok.accepted += est
        if used_tokens is not None and self.tokens is not None:
            self.tokens.adjust(est - used_tokens)
        if headers is not None and has_limits(headers):
            self._observe(lease, headers, status)
        if self.cold.active and outcome is not Released.NO_ANSWER:
            self._warm()
        if outcome is Released.THROTTLED:
            retry_after = retry_after_s(headers) if headers is not None else None
            wait = retry_after if retry_after is not None else self.tune.default_pause_s
            self.pacer.on_429(lease.epoch, wait, self.mirror_req is not None)
        elif outcome is Released.OK:
            self.pacer.on_ok(lease.epoch, self.mirror_req is not None)

    def _warm(self) -> None:
        """The first answer ends the cold start; without limits in sight, the gates open."""
        self.cold.end()
        self._gated = (
            self.requests is not None
            or self.tokens is not None
            or self.mirror_req is not None
            or self.mirror_tok is not None
            or self.paused_until > time.monotonic()
        )

    def _observe(self, lease: Lease, headers: Mapping[str, str], status: int) -> None:
        """Feed the server mirrors one reply's ``x-ratelimit-*`` (``providers.ratelimit``)."""
        # The server counted this call when it arrived, shortly after we sent it: the bound on
        # its allowance holds from the send time on (using the reply time would hide the refill
        # of one latency and keep that much of the server's bucket unused).
        now = lease.t or time.monotonic()
        refused = status == 429
        if (said := server_limit(headers, "requests")) is not None:
            if self.mirror_req is None:
                self.mirror_req = LimitMirror()
                self._gated = True
                self.pacer.mirrored()  # the mirror replaces blind AIMD
                if self.pacer.ceiling is None:
                    self.requests = None
            ours = counted(lease.acc_req, lease.sent_req, self.req.refused) + (0.0 if refused else 1.0)
            self.mirror_req.observe(
                said.remaining, ours, now, said.reset_s, said.limit, 60.0, rejected=refused
            )
        if (said := server_limit(headers, "tokens")) is not None:
            if self.mirror_tok is None:
                self.mirror_tok = LimitMirror()
                self._gated = True
            ours = counted(lease.acc_tok, lease.sent_tok, self.tok.refused)
            ours += 0.0 if refused else lease.est_tokens
            self.mirror_tok.observe(
                said.remaining, ours, now, said.reset_s, said.limit, 60.0, rejected=refused
            )

    # -- the gates the pacer acts on (engine.request.pacer.Gates) ----------------------------
    def pace_bucket(self, pace: float, now: float, raised: bool) -> None:
        if self.requests is None:
            self.requests = TokenBucket(pace)
            self._gated = True
            if self.paused_until > now:  # born during a pause: it starts when the pause ends
                self.requests.hold(now, self.paused_until)
        else:
            self.requests.set_rate(pace, now)
        if raised:
            self._wake_waiters()

    def let_probe(self) -> None:
        assert self.requests is not None
        self.requests.adjust(1.0)
        self._wake_waiters()

    def _wake_waiters(self) -> None:
        """Queued calls recompute when they are due (their places are tickets, not times)."""
        if self._wake is not None:
            self._wake.set()
            self._wake = None

    def pause(self, until: float) -> None:
        """Hold every new call of this endpoint until ``until`` (``time.monotonic`` clock)."""
        now = time.monotonic()
        if until <= max(now, self.paused_until):
            return
        self.paused_until = until
        self._gated = True
        for bucket in (self.requests, self.tokens):
            if bucket is not None:
                bucket.hold(now, until)

    # -- one key (a pool of several is ``engine.request.keypool.KeyPool``) --------------------
    def key_of(self, lease: Lease) -> int:
        return 0

    def retire(self, lease: Lease) -> tuple[bool, int]:
        """One key refused: nothing to fall back on (the run aborts)."""
        return False, 0

    # -- introspection ----------------------------------------------------------------------
    def effective_rpm(self) -> float | None:
        """The request rate admission currently aims at (learned or configured), per minute."""
        rates = [r for r in (self.pacer.pace, self.mirror_req.pace if self.mirror_req else None) if r]
        return min(rates) * 60 if rates else None
