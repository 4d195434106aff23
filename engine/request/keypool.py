"""A pool of API keys behind one endpoint (``keys = [...]``), each within its own limits and its
group's, as one admission (an ``Admitter``, like ``engine.request.admission.Admission``).

Each key has its own ``Admission``: its configured RPM/TPM, and what it learns from its own
headers and 429s (server mirror, blind AIMD, probing), so a key's 429s slow that key alone. A
group (an organisation or project whose keys share one quota) with configured limits is a pair
of token buckets every call of its keys reserves in first; so is the endpoint's own ``rpm``/``tpm``,
which caps the whole pool. A group of two keys or more without configured limits has its own
``Admission`` as well, which learns the group's hidden limit: a 429 is the group's when another
key of the group was refused within ``SHARED_S`` (a group's limit refuses all of its keys, a
key's own limit that key alone), and then teaches the group's pace, not the key's. Left to each
key, two keys would each learn the group's limit against the other's traffic, and their cuts
would add up.

Scheduling: a call goes to the live key whose queue would clear first (calls waiting for it
over its current rate, plus any pause), so every key stays busy in proportion to its limit. With
an *affinity* (a problem id, or the prompt prefix) the call keeps to the key it had before while
that key is within ``AFFINITY_SLACK_S`` of the best: provider prompt caches are per organisation,
so a problem's prompts meet their cached prefix again.

A key answered 401/403 is retired for the run (``retire``): the call goes again on another key,
and the run aborts only when none is left (``NoKeyLeft``).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

from fairdistill.engine.config import EndpointConfig, GroupConfig
from fairdistill.engine.errors import AuthError
from fairdistill.engine.request.admission import Admission
from fairdistill.engine.request.buckets import TokenBucket
from fairdistill.engine.request.mirror import Lease
from fairdistill.engine.request.tunables import TUNABLES, Tunables

AFFINITY_SLACK_S = 0.25  # a pinned key is kept while its queue clears within this of the best key's
MAX_PINS = 1 << 16  # affinities remembered (least recently used forgotten first)
SHARED_S = 1.0  # a 429 this soon after another key of its group's is the group's
UNKNOWN_S = 1e-3  # queue cost of a call on a key whose rate is not known yet (no limit seen)


class NoKeyLeft(AuthError):
    """Every key of a pool was refused (401/403): the run aborts."""


@dataclass(slots=True)
class PoolKey:
    """One key of a pool at run time: its variable's name (never the value), its group, its own
    admission, and its counts."""

    index: int
    env: str
    group: str
    admission: Admission
    live: bool = True
    waiting: int = 0  # calls that chose it and wait for its admission
    in_flight: int = 0  # calls admitted on it and not yet released
    sent: int = 0
    throttled: int = 0

    def wait_s(self, now: float) -> float:
        """Seconds until a call queued on this key now would go: its queue over its rate, plus
        a pause in force. A key whose rate is not known yet (nothing refused, no headers) costs
        next to nothing per queued call (it has shown no limit), and less still per call in
        flight, so such keys share the calls evenly and each learns its own limit."""
        a = self.admission
        paused = max(0.0, a.paused_until - now)
        rpm = a.effective_rpm()
        if rpm:
            return paused + (self.waiting + 1) * 60.0 / rpm
        return paused + (self.waiting + self.in_flight * UNKNOWN_S) * UNKNOWN_S


class Gate:
    """Configured limits shared by several keys (a group, or the whole endpoint): token buckets a
    call reserves its place in before it queues on its key."""

    __slots__ = ("requests", "tokens")

    def __init__(self, rpm: float | None, tpm: float | None):
        self.requests = TokenBucket(rpm / 60) if rpm else None
        self.tokens = TokenBucket(tpm / 60, capacity=max(tpm / 60, 1.0)) if tpm else None

    def reserve(self, est_tokens: float, now: float) -> float:
        delay = self.requests.reserve(1.0, now) if self.requests is not None else 0.0
        if self.tokens is not None:
            delay = max(delay, self.tokens.reserve(est_tokens, now))
        return delay

    def settle(self, est_tokens: float, used_tokens: float) -> None:
        if self.tokens is not None:
            self.tokens.adjust(est_tokens - used_tokens)


class PoolLease:
    """One admitted call of a pool: the key it goes out with, that key's own lease, and its
    group's where the group's pace is learned."""

    __slots__ = ("est_tokens", "group", "inner", "key")

    def __init__(self, key: int, inner: Lease, est_tokens: float, group: Lease | None = None):
        self.key = key
        self.inner = inner
        self.est_tokens = est_tokens
        self.group = group


class KeyPool:
    """The admission of an endpoint with a key pool (see the module docstring)."""

    def __init__(self, cfg: EndpointConfig, tune: Tunables = TUNABLES):
        self.name = cfg.name
        self.affinity = cfg.key_affinity
        self.keys = tuple(
            PoolKey(i, k.env, k.group_name, Admission(cfg.concurrency, k.rpm, k.tpm, tune))
            for i, k in enumerate(cfg.keys)
        )
        self._gates = gates(cfg.groups, cfg.rpm, cfg.tpm)
        self._learned = learned(self.keys, self._gates, cfg.concurrency, tune)
        self._refused_at: dict[int, float] = {}  # each key's last 429 (a group's 429s hit them all)
        self._sem = asyncio.Semaphore(cfg.concurrency)
        self._pins: OrderedDict[int, int] = OrderedDict()
        self.left = len(self.keys)

    def __repr__(self) -> str:
        live = [k.env for k in self.keys if k.live]
        return f"KeyPool({self.name!r}, live={live})"

    # -- acquire / release ------------------------------------------------------------------
    async def acquire(self, est_tokens: float = 0.0, affinity: int = 0) -> PoolLease:
        await self._sem.acquire()
        try:
            key = self.choose(affinity if self.affinity else 0)
            key.waiting += 1
            try:
                delay = 0.0
                now = time.monotonic()
                for name in (key.group, ""):
                    if (gate := self._gates.get(name)) is not None:
                        delay = max(delay, gate.reserve(est_tokens, now))
                if delay > 0:
                    await asyncio.sleep(delay)
                group = await self._group_lease(key, est_tokens)
                try:
                    inner = await key.admission.acquire(est_tokens)
                except BaseException:
                    if group is not None:
                        self._learned[key.group].release(group, 0)
                    raise
            finally:
                key.waiting -= 1
        except BaseException:
            self._sem.release()
            raise
        key.sent += 1
        key.in_flight += 1
        return PoolLease(key.index, inner, est_tokens, group)

    async def _group_lease(self, key: PoolKey, est_tokens: float) -> Lease | None:
        learner = self._learned.get(key.group)
        return None if learner is None else await learner.acquire(est_tokens)

    def release(
        self,
        lease: PoolLease,
        status: int,
        headers: Mapping[str, str] | None = None,
        used_tokens: float | None = None,
    ) -> None:
        self._sem.release()
        key = self.keys[lease.key]
        key.in_flight -= 1
        if status == 429:
            key.throttled += 1
        learner = self._learned.get(key.group)
        if learner is None or lease.group is None:
            key.admission.release(lease.inner, status, headers, used_tokens)
        elif status == 429 and self._shared(key):  # the group's limit: its pace learns, not the key's
            key.admission.release(lease.inner, 0, None, used_tokens)
            learner.release(lease.group, status, headers)
        else:
            key.admission.release(lease.inner, status, headers, used_tokens)
            learner.release(lease.group, 0 if status == 429 else status)
        if used_tokens is not None:
            for name in (key.group, ""):
                if (gate := self._gates.get(name)) is not None:
                    gate.settle(lease.est_tokens, used_tokens)

    def _shared(self, key: PoolKey) -> bool:
        """Whether a 429 of ``key`` is its group's: another key of the group was refused within
        ``SHARED_S`` (a key's own limit refuses that key alone)."""
        now = time.monotonic()
        self._refused_at[key.index] = now
        return any(
            now - t < SHARED_S and i != key.index and self.keys[i].group == key.group
            for i, t in self._refused_at.items()
        )

    def wait_s(self, key: PoolKey, now: float) -> float:
        """Seconds until a call queued on ``key`` now would go: its own queue, or its group's
        where the group's pace is learned and slower."""
        wait = key.wait_s(now)
        learner = self._learned.get(key.group)
        if learner is None or not (rpm := learner.effective_rpm()):
            return wait
        queued = sum(k.waiting for k in self.keys if k.group == key.group)
        return max(wait, max(0.0, learner.paused_until - now) + (queued + 1) * 60.0 / rpm)

    def choose(self, affinity: int) -> PoolKey:
        """The live key a call goes to: the one whose queue clears first, or the key its
        affinity was pinned to while that one is within ``AFFINITY_SLACK_S`` of it."""
        now = time.monotonic()
        waits = {k.index: self.wait_s(k, now) for k in self.keys if k.live}
        if not waits:
            raise self.none_left()
        best = self.keys[min(waits, key=lambda i: (waits[i], self.keys[i].sent))]  # ties: the least used
        if not affinity:
            return best
        pinned = self._pins.get(affinity)
        if pinned is not None and pinned != best.index:
            key = self.keys[pinned]
            if key.live and waits[pinned] <= waits[best.index] + AFFINITY_SLACK_S:
                self._pins.move_to_end(affinity)
                return key
        self._pins[affinity] = best.index
        self._pins.move_to_end(affinity)
        if len(self._pins) > MAX_PINS:
            self._pins.popitem(last=False)
        return best

    # -- faults -----------------------------------------------------------------------------
    def retire(self, lease: PoolLease) -> tuple[bool, int]:
        """The key of ``lease`` was refused (401/403): no call goes out with it again. Returns
        (whether this retired it, keys left); calls already queued on it go and come back refused
        too, and are sent again on another key."""
        key = self.keys[lease.key]
        if not key.live:
            return False, self.left
        key.live = False
        self.left -= 1
        return True, self.left

    def none_left(self) -> NoKeyLeft:
        envs = ", ".join(k.env for k in self.keys)
        return NoKeyLeft(f"endpoint {self.name!r}: every key of the pool was refused (401/403): {envs}")

    # -- introspection ----------------------------------------------------------------------
    def shared_buckets(self) -> list[TokenBucket]:
        """The configured buckets its keys share (groups', the endpoint's): a shared limiter
        starts them empty, as it does each key's (``engine.scale.limiter.start_empty``)."""
        return [b for g in self._gates.values() for b in (g.requests, g.tokens) if b is not None]

    def key_of(self, lease: PoolLease) -> int:
        return lease.key

    @property
    def ungated(self) -> bool:
        """Never: every call must choose its key (a shared limiter lends no leases for a pool)."""
        return False

    def effective_rpm(self) -> float | None:
        """The pool's aim: the sum of its live keys' rates where known."""
        rates = [r for k in self.keys if k.live and (r := k.admission.effective_rpm())]
        return sum(rates) if rates else None


def gates(groups: Mapping[str, GroupConfig], rpm: float | None, tpm: float | None) -> dict[str, Gate]:
    """The configured shared limits: one gate per group that has any, and "" for the endpoint."""
    out = {name: Gate(g.rpm, g.tpm) for name, g in groups.items() if g.rpm or g.tpm}
    if rpm or tpm:
        out[""] = Gate(rpm, tpm)
    return out


def learned(
    keys: tuple[PoolKey, ...], configured: Mapping[str, Gate], concurrency: int, tune: Tunables
) -> dict[str, Admission]:
    """The groups whose shared limit is learned: two keys or more and no configured limit. Each
    has an admission of its own, fed the group's 429s only (``KeyPool._shared``), so their pace
    is learned once for the group rather than by each key against the others."""
    groups: dict[str, int] = {}
    for key in keys:
        groups[key.group] = groups.get(key.group, 0) + 1
    return {g: Admission(concurrency, tune=tune) for g, n in groups.items() if n > 1 and g not in configured}
