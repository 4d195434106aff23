"""Blind AIMD and probing: the pace of an endpoint whose server says nothing but 429s.

A 429 cuts the rate to what the server actually accepted since the last cut (at most halving
it), at most once a second and once per burst (a 429 from a call admitted before the last cut
does not cut again); the accepted rate is remembered as the *knee*. Success creeps the rate back
up: fast while far below the knee, slowly near it, a little faster past it. Before anything was
accepted there is nothing to measure: a 429 then pauses and starts the pace from what the first
wave got through (``Pacer.first_wave``).

A 429 to a call admitted since the last cut while none of those succeeded is a *block* (a window
or quota is spent), not a pace that is too high. Cutting on every 429 of it (once a second) would
halve the rate to the floor in ten seconds, and the calls queued at that rate would keep their
late places long after the window reopens (the collapse of issue 11: one call every 5-10 s,
3,572 of 6,000 done after 240 s where 70 s suffice). So the rate is kept, one probe goes per
``Retry-After`` (doubling up to ``Tunables.probe_max_s``), and when a probe passes the pace
starts again from 1/``ramp_from`` of the rate and doubles every ``ramp_step_s``.

The pacer decides; admission (``engine.request.admission``) owns the gates it acts on, through
``Gates``: the pause, the request bucket's pace, the probe's place.
"""

from __future__ import annotations

import time
from typing import Protocol

from fairdistill.engine.request.tunables import Tunables


class Gates(Protocol):
    """What the pacer acts on (``Admission`` is the one implementation)."""

    def pause(self, until: float) -> None: ...

    def pace_bucket(self, pace: float, now: float, raised: bool) -> None:
        """Run the request bucket at ``pace`` req/s (made if there is none); ``raised``: wake
        the queued calls, their places come sooner."""
        ...

    def let_probe(self) -> None:
        """Give the next queued call (the probe) its place at the end of the pause."""
        ...


class Pacer:
    """The AIMD rate and the probing of one endpoint (see the module docstring)."""

    __slots__ = (
        "blocked", "ceiling", "epoch", "gates", "knee", "last_creep", "last_cut", "ok_since_cut",
        "ok_this_epoch", "pace", "probe_s", "provisional", "ramp_t", "rate", "tune", "wave_until",
    )  # fmt: skip

    def __init__(self, ceiling: float | None, tune: Tunables, gates: Gates):
        self.ceiling = ceiling  # configured req/s, never exceeded
        self.tune = tune
        self.gates = gates
        self.rate: float | None = ceiling  # effective blind-AIMD req/s (None: unbounded)
        self.pace: float | None = ceiling  # what the request bucket runs at now (<= rate)
        self.epoch = 0  # bumps on every cut and block (a burst of 429s acts once)
        self.blocked = False  # everything is refused: one probe at a time until one passes
        self.knee: float | None = None  # accepted rate at the last cut
        self.probe_s = tune.default_pause_s
        self.ramp_t = 0.0
        self.last_cut = time.monotonic()
        self.last_creep = self.last_cut
        self.ok_since_cut = 0
        self.ok_this_epoch = 0  # successes of calls admitted since the last cut or block
        self.provisional = False  # the rate is the first wave's guess (``first_wave_ok``)
        self.wave_until = 0.0  # the pause after the first wave: its successes until then count

    def absorb(self, n: int) -> None:
        """``n`` successes counted at once (calls that ran on lent leases)."""
        self.ok_since_cut += n
        self.ok_this_epoch += n

    def mirrored(self) -> None:
        """A server mirror took over (the server states its limits): blind AIMD stops."""
        self.rate = self.pace = self.ceiling
        self.blocked = False

    def on_ok(self, epoch: int, mirrored: bool) -> None:
        """A 2xx of a call admitted in ``epoch``: ramp back up after a refusal, or creep."""
        self.ok_since_cut += 1
        if epoch == self.epoch:
            self.ok_this_epoch += 1
        if mirrored:
            return
        if epoch < self.epoch and (self.rate is None or self.provisional):
            if time.monotonic() < self.wave_until:
                self.first_wave_ok()
            return
        if self.rate is None:
            return
        self.provisional = False  # a call sent at the first wave's pace passed: adapt as usual
        if self.blocked:
            if epoch == self.epoch:  # the probe passed: the limit has room again
                self.ramp()
        elif self.pace is not None and self.pace < self.rate:
            self.ramp()
        elif self.rate != self.ceiling:
            self.creep()

    def on_429(self, epoch: int, wait: float, mirrored: bool) -> None:
        """A 429 of a call admitted in ``epoch``, asking for ``wait`` seconds: pause, and cut
        the rate or block (see the module docstring)."""
        now = time.monotonic()
        if mirrored or epoch != self.epoch:
            self.gates.pause(now + wait)  # the mirror has resynced already / this burst has acted
            return
        if self.rate is None and not self.ok_since_cut and not self.epoch:
            self.first_wave(now, wait)
            return
        if self.rate is not None and not self.ok_this_epoch:
            self.block(now, wait)  # nothing sent since the last cut got through: not the pace
            return
        self.gates.pause(now + wait)
        span = now - self.last_cut  # blind AIMD: cut to what the server accepted since the last cut
        t = self.tune
        if not self.ok_since_cut or (span < t.cut_interval_s and self.rate is not None):
            return  # (the first cut may come early: until it, nothing holds the calls back)
        self.epoch += 1
        self.ok_this_epoch = 0
        accepted = self.ok_since_cut / max(span, t.ramp_step_s)
        pace = self.pace if self.pace is not None else self.rate  # cut from what was sent at
        floor = accepted * 0.97
        new = floor if pace is None else min(max(floor, pace * t.max_cut), pace * t.min_cut)
        self.knee = max(accepted, new)
        self.set_rate(max(t.min_rate, new), now)
        self.last_cut = self.last_creep = now
        self.ok_since_cut = 0

    def first_wave(self, now: float, wait: float) -> None:
        """The first calls outran the server's burst: refused before any came back accepted.
        Only pause (nothing accepted: nothing to cut to), but open a new epoch, so that the
        first wave's successes that come back during the pause tell how large the burst was
        (``first_wave_ok``); a storm that refuses the whole wave leaves the rate unset."""
        self.epoch += 1
        self.ok_this_epoch = 0
        self.wave_until = now + wait
        self.gates.pause(self.wave_until)

    def first_wave_ok(self) -> None:
        """A success of the first wave: the pace starts at what that wave got through per
        second (a bucket of one second's worth, the common case; a larger one would have let the
        whole wave through), rather than releasing everything queued when the pause ends, which
        would be refused again (a wave of the concurrency's size)."""
        self.provisional = True
        wave = self.ok_since_cut / self.tune.cut_interval_s
        self.set_rate(max(self.rate or 0.0, self.tune.min_rate, wave), time.monotonic())

    def block(self, now: float, wait: float) -> None:
        """Everything is refused (a window or quota is spent), whatever the pace: cutting the
        rate would only learn a rate of zero, and the calls queued at it would stay queued long
        after the limit reopens. Keep the rate; send one probe per ``Retry-After`` (doubling up
        to ``tune.probe_max_s`` while they are refused too) until one passes, then ramp back up."""
        self.epoch += 1  # the calls already out come back refused too: they say nothing new
        self.ok_this_epoch = 0
        wait = max(wait, self.tune.probe_min_s)
        self.probe_s = min(self.tune.probe_max_s, max(wait, 2 * self.probe_s)) if self.blocked else wait
        self.blocked = True
        self.gates.pause(now + self.probe_s)
        self.set_pace(1.0 / self.probe_s, now)  # those queued wait behind the probe...
        self.gates.let_probe()  # ...which goes when the pause ends

    def ramp(self) -> None:
        """After a refusal: the pace doubles every ``tune.ramp_step_s`` of successes up to the rate."""
        now = time.monotonic()
        assert self.rate is not None
        if self.blocked:
            self.blocked = False
            self.last_cut = self.last_creep = now  # measure what is accepted from here
            self.ok_since_cut = self.ok_this_epoch = 1
            self.ramp_t = now
            self.set_pace(min(self.rate, max(2.0 / self.probe_s, self.rate / self.tune.ramp_from)), now)
        elif now - self.ramp_t >= self.tune.ramp_step_s:
            self.ramp_t = now
            self.set_pace(min(self.rate, 2 * (self.pace or self.rate)), now)

    def creep(self) -> None:
        now = time.monotonic()
        if now - self.last_cut < self.tune.cooldown_s or now - self.last_creep < 0.25:
            return
        rate = self.rate
        assert rate is not None
        knee = self.knee or rate
        t = self.tune
        per_s = t.creep_far if rate < 0.85 * knee else t.creep_past if rate > 1.1 * knee else t.creep_near
        new = rate * (1 + per_s * (now - self.last_creep))
        self.last_creep = now
        if self.ceiling:
            new = min(new, self.ceiling)
        self.set_rate(new, now)

    def set_rate(self, rate: float, now: float) -> None:
        self.rate = rate
        self.set_pace(rate, now)

    def set_pace(self, pace: float, now: float) -> None:
        raised = self.pace is None or pace > self.pace
        self.pace = pace
        self.gates.pace_bucket(pace, now, raised)
