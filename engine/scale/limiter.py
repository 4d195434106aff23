"""Global limits: each endpoint's real ``Admission`` in one Ray actor, and the workers' proxy.

``Limiter`` (an async actor, restarted by Ray if it dies) holds one ``engine.request.admission.Admission``
per endpoint, built from the endpoint's config exactly as a single process would, so the 429
and header learning is the single-process code on one clock. ``AdmissionProxy`` has the same
``acquire`` / ``release`` / ``effective_rpm`` as ``Admission`` and is what a worker's ``Engine``
is given (``Engine(admissions=...)``). It batches:

* acquires: calls waiting locally go to the limiter together, one round trip in flight per
  worker and endpoint; the limiter answers with every lease it can give them as soon as one
  is granted (``LINGER_S`` more for the rest of a batch), when the endpoint's lending opens or
  closes, or after ``HOLD_S``; the rest wait in its queue for the next round trip;
* releases: gathered for ``FLUSH_S`` and sent as one fire-and-forget message, apart from
  acquires (a release must never wait behind an acquire that it would unblock); the same
  message carries what is not urgent (gathered up to ``DROP_S``): the requests the worker
  served itself with a lent lease, which the limiter drops from its queue (one whose acquire
  is still on the way, Ray may run them out of order, is dropped when it comes), and tallies;
* slot lending: while an endpoint's ``Admission`` has nothing but its concurrency cap in force
  (warm, no RPM/TPM bucket, no server mirror, no pause), every reply says so, and the worker's
  leases are *lent* for ``LEND_S`` from their grant: a call that ends 2xx without rate-limit
  headers passes its lease on with no round trip, first to the task that ended it if that task
  asks for its next call in the same step (as the generate loop does: it goes on without ever
  waiting, as a single process does with its own semaphore), else to the worker's oldest
  waiting call. The lease stays a real lease of the limiter's semaphore, so the global cap is
  exact (a worker holds at most the leases it was granted); when its term is over, or nothing
  waits locally, or an outcome is not plain 2xx (which also stops the worker's lending until
  the limiter says open again), it goes back with its outcome as usual. An outcome that ends
  lending (a 429, limit headers) answers every worker's held round trip at once, so the others
  stop within one message. The outcomes absorbed by lending are counted back (``tally``) so
  the AIMD's accepted rate stays the single-process one.

Measured on the 300 ms arm of ``fair bench scale`` (2 workers, 256 global), the calls were not
held back by one acquire in flight: leases in use stayed at 250-256 of 256 after the start. Ray
was slower (0.89-0.95x) because each call cost the workers about twice a single process's CPU
on cores shared with the simulator, whose answers then came later (~480 remote calls a run, now
~130-200; a new connection pool per block), because two hand-offs that never wait in one process
went through a future and a loop turn each, and because a block's first round trip waited for
its 512 tasks' first steps (``worker.START_BATCH``). Drops used to ride on the next acquire and
were lost when a worker had nothing left to ask: their requests were granted later and their
leases never came back (up to 248 of 256 once acquires were held longer).

Key pools (``EndpointConfig.keys``): the limiter holds the endpoint's ``KeyPool`` (sent its
config without headers: variable names and limits, never a key), so each key's and each group's
quota is shared by every worker. A proxy's acquire carries the call's affinity; each ``Grant``
names the key (an index; the worker's engine holds the key values, read from its own
environment). Pools are never lent (``KeyPool.ungated`` is False). A key refused 401/403 is
retired in the pool by the first worker that tells it (``retire``): the driver prints that line
once (``take_news``), and once none is left, acquires come back refused (``AuthError``, exit 3).

A worker that dies holds leases: the driver calls ``forget(worker)``, which releases them (as
answered: the server may have counted them) and drops its waiting acquires. If the limiter
itself dies, Ray restarts it with fresh admissions (limits are relearned from the next
replies); proxies resubmit what was waiting, and releases of the old incarnation's leases are
ignored.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import itertools
import os
import random
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import msgspec
import ray

from fairdistill.engine.config import EndpointConfig
from fairdistill.engine.errors import AuthError
from fairdistill.engine.request.admission import Admission, Lease
from fairdistill.engine.request.buckets import TokenBucket
from fairdistill.engine.request.keypool import KeyPool, PoolLease
from fairdistill.engine.request.mirror import Units
from fairdistill.engine.scale.budget import Ledger

HOLD_S = 1.0  # longest a limiter round trip waits with nothing granted (lending news answers at once)
LINGER_S = 0.005  # after a first grant, how long a round trip waits for more (bigger batches)
FLUSH_S = 0.003  # releases are gathered this long into one message
DROP_S = 0.02  # ...and drops (requests served here) and tallies, which are not urgent, this long
RETRY_S = 0.2  # pause before a proxy retries a limiter that is restarting
TALLY_EVERY = 256  # absorbed outcomes are told at least this often (else with the next release)
LEND_S = 5.0  # how long a lent lease may be reused by its worker without asking (open endpoints)

# endpoint -> (concurrency, rpm, tpm), or for a key pool its config (names of variables, never a key)
Limits = Mapping[str, "tuple[int, float | None, float | None] | EndpointConfig"]


class Grant(NamedTuple):
    """The limiter's answer to one queued request: its lease id and the pool's key index (0 for
    an endpoint without a pool), or ``lease`` -1 and the error (no key of the pool is left)."""

    req: int
    lease: int
    key: int = 0
    error: str | None = None


class LimiterState:
    """Every endpoint's ``Admission``, once for the whole cluster (``Limiter`` is this as a Ray
    actor; the class itself is plain, so its protocol is testable without a cluster)."""

    def __init__(
        self, limits: Limits, pid_dir: str | None = None, budget: tuple[float, str | None] | None = None
    ):
        """``budget``: (``run.max_cost_usd``, the run directory) for the run's ``Ledger``."""
        self.admissions: dict[str, Any] = {name: admitter(lim) for name, lim in limits.items()}
        self.given: dict[tuple[str, int], int] = {}  # (endpoint, key) -> leases granted so far
        self.news: list[str] = []  # keys retired since the driver last asked (``take_news``)
        self.ledger = Ledger(budget[0], Path(budget[1]) if budget[1] else None) if budget else None
        self.idle = set(self.admissions)  # endpoints not asked for yet (buckets emptied at first ask)
        # lease id -> (worker, endpoint, lease: a pool's names its key)
        self.leases: dict[int, tuple[str, str, Lease | PoolLease]] = {}
        self.waiting: dict[tuple[str, str], dict[int, asyncio.Task[Lease]]] = {}
        self.ready: dict[tuple[str, str], dict[int, asyncio.Task[Lease]]] = {}  # done, not yet handed out
        self.wake: dict[tuple[str, str], asyncio.Event] = {}
        self.early: dict[tuple[str, str], set[int]] = {}  # dropped before their acquire came
        self.newest: dict[tuple[str, str], int] = {}  # the highest request id seen
        # lease ids unique across restarts, so an old incarnation's lease is never mistaken
        self._ids = itertools.count(random.getrandbits(40) << 20)
        if pid_dir:
            Path(pid_dir).mkdir(parents=True, exist_ok=True)
            (Path(pid_dir) / "limiter").write_text(f"{os.getpid()}\n")

    async def acquire(
        self, worker: str, endpoint: str, new: list[tuple[int, float] | tuple[int, float, int]]
    ) -> tuple[list[Grant], float | None, float]:
        """Queue ``new`` (request id, est tokens[, affinity]); return the ``Grant`` of each
        request granted (or refused) once any of this worker's waiting requests is (or lending
        ends, or ``HOLD_S`` passed), the endpoint's target rpm, and for how long the grants are
        lent (0: not lent, give each back when its call ends; always 0 for a key pool)."""
        admission = self.admissions[endpoint]
        if endpoint in self.idle:
            self.idle.discard(endpoint)
            start_empty(admission)
        key = (worker, endpoint)
        waiting = self.waiting.setdefault(key, {})
        ready = self.ready.setdefault(key, {})
        wake = self.wake.setdefault(key, asyncio.Event())
        early = self.early.get(key)
        if new:  # a proxy's acquires come one after the other, their request ids rising
            self.newest[key] = new[-1][0]
        for req, est, *affinity in new:
            if early and req in early:  # dropped before it arrived (calls may run out of order)
                early.discard(req)
                continue
            aff = affinity[0] if affinity else 0
            task = asyncio.ensure_future(admission.acquire(est, aff) if aff else admission.acquire(est))
            waiting[req] = task
            task.add_done_callback(functools.partial(self._granted, key, req))
        if waiting and not ready:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(HOLD_S):
                    await wake.wait()
            await asyncio.sleep(LINGER_S)  # the grants a batch of releases frees land together
        wake.clear()
        granted = [g for req, task in list(ready.items()) if (g := self._grant(key, req, task))]
        return granted, admission.effective_rpm(), LEND_S if getattr(admission, "ungated", False) else 0.0

    def _grant(self, key: tuple[str, str], req: int, task: asyncio.Task[Any]) -> Grant | None:
        """A ready request as the worker's ``Grant`` (None: it was dropped meanwhile)."""
        del self.ready[key][req]
        if self.waiting[key].pop(req, None) is None:
            return None
        exc = task.exception()
        if exc is not None:  # a pool with no key left (AuthError); anything else is a bug, said alike
            return Grant(req, -1, error=str(exc) if isinstance(exc, AuthError) else repr(exc))
        worker, endpoint = key
        lease = task.result()
        lease_id = next(self._ids)
        self.leases[lease_id] = (worker, endpoint, lease)
        index = key_of(self.admissions[endpoint], lease)
        self.given[(endpoint, index)] = self.given.get((endpoint, index), 0) + 1
        return Grant(req, lease_id, index)

    def _granted(self, key: tuple[str, str], req: int, task: asyncio.Task[Lease]) -> None:
        """A waiting request got its lease: ready for the worker's round trip (not when it was
        dropped meanwhile: a cancelled request must not wake a held round trip)."""
        if not task.cancelled() and req in self.waiting.get(key, ()):
            self.ready[key][req] = task
            self.wake[key].set()

    def _drop(self, key: tuple[str, str], reqs: list[int]) -> None:
        """Forget requests the worker served itself, with a lent lease; one granted meanwhile
        goes back unused."""
        waiting, ready = self.waiting.get(key, {}), self.ready.get(key, {})
        admission = self.admissions[key[1]]
        for req in reqs:
            task = waiting.pop(req, None)
            ready.pop(req, None)
            if task is None:
                if req > self.newest.get(key, -1):  # its acquire is still on the way: ignore it then
                    self.early.setdefault(key, set()).add(req)
                continue
            if task.done() and not task.cancelled() and task.exception() is None:
                admission.release(task.result(), 0)
            else:
                task.cancel()

    def release(
        self,
        done: list[tuple[int, int, dict[str, str] | None, float | None]],
        tally: dict[str, int] | None = None,
        dropped: tuple[str, str, list[int]] | None = None,
    ) -> None:
        """Give leases back with their outcome (``Admission.release``); unknown ids are ignored.
        ``tally``: per endpoint, the plain 2xx outcomes absorbed by lent leases meanwhile;
        ``dropped``: (worker, endpoint, request ids) the worker served itself (see ``_drop``)."""
        if dropped is not None:
            self._drop((dropped[0], dropped[1]), dropped[2])
        for endpoint, n in (tally or {}).items():
            if endpoint in self.admissions:
                self.admissions[endpoint].absorb(n)
        for lease_id, status, headers, used in done:
            item = self.leases.pop(lease_id, None)
            if item is not None:
                admission = self.admissions[item[1]]
                lending = getattr(admission, "ungated", False)
                admission.release(item[2], status, headers, used)
                if lending != getattr(admission, "ungated", False):
                    self._tell_all(item[1])

    def retire(self, endpoint: str, lease_id: int, key: int) -> None:
        """A worker's call on pool key ``key`` (lease ``lease_id``) was refused its credentials:
        the pool retires the key for the run (``KeyPool.retire``). The first to tell it makes the
        line the driver prints (``take_news``): each retired key is said once, whatever the
        number of workers that met its 401s."""
        pool = self.admissions.get(endpoint)
        if not isinstance(pool, KeyPool) or not 0 <= key < len(pool.keys):
            return
        held = self.leases.get(lease_id)
        lease = held[2] if held is not None else None
        if not isinstance(lease, PoolLease):  # given back already (or before a restart): its key is known
            lease = PoolLease(key, Lease(0.0, 0, Units(), Units()), 0.0)
        newly, left = pool.retire(lease)
        if newly:
            self.news.append(
                f"fair: endpoint {endpoint!r}: key {pool.keys[key].env} was refused (401/403); "
                f"retired for this run, {left} of {len(pool.keys)} keys left"
            )

    def take_news(self) -> list[str]:
        """The lines about keys retired since the last call (the driver prints them)."""
        news, self.news = self.news, []
        return news

    def _tell_all(self, endpoint: str) -> None:
        """Lending ended (or began): answer every worker's held round trip now, so no worker
        keeps reusing leases (or giving back leases it could reuse) until its hold times out."""
        for (_, ep), wake in self.wake.items():
            if ep == endpoint:
                wake.set()

    def forget(self, worker: str) -> int:
        """A dead worker: release its leases and drop its waiting acquires; returns how many."""
        n = 0
        for lease_id, (who, endpoint, lease) in list(self.leases.items()):
            if who == worker:
                del self.leases[lease_id]
                self.admissions[endpoint].release(lease, 0)
                n += 1
        for (who, endpoint), waiting in list(self.waiting.items()):
            if who != worker:
                continue
            del self.waiting[(who, endpoint)]
            self.ready.pop((who, endpoint), None)
            for task in waiting.values():
                if task.done() and not task.cancelled() and task.exception() is None:
                    self.admissions[endpoint].release(task.result(), 0)
                    n += 1
                else:
                    task.cancel()
        return n

    def reserve(self, writer: str, spent: float, finished: int) -> tuple[str, float]:
        """``Ledger.reserve``: may this block attempt start one more problem under the cap?"""
        assert self.ledger is not None, "no run.max_cost_usd"
        return self.ledger.reserve(writer, spent, finished)

    def report(self, writer: str, spent: float, finished: int) -> None:
        """A block attempt's final totals (``Ledger.report``)."""
        if self.ledger is not None:
            self.ledger.report(writer, spent, finished)

    def admission_state(self) -> dict[str, dict[str, Any]]:
        """Per endpoint: the target rate and the leases out (``--metrics-port``: engine.scale.metrics);
        for a key pool also ``keys``: per variable name, its group, whether it is live, its rate,
        its leases out and granted so far, and the pool's own counts (``sent``, ``throttled``)."""
        out: dict[str, dict[str, Any]] = {name: {"rpm": a.effective_rpm(), "leases": 0}
                                          for name, a in self.admissions.items()}  # fmt: skip
        out_by_key: collections.Counter[tuple[str, int]] = collections.Counter()
        for _, endpoint, lease in self.leases.values():
            out[endpoint]["leases"] += 1
            out_by_key[(endpoint, key_of(self.admissions[endpoint], lease))] += 1
        for name, pool in self.admissions.items():
            if isinstance(pool, KeyPool):
                out[name]["keys"] = {
                    k.env: {"group": k.group, "live": k.live, "rpm": k.admission.effective_rpm(),
                            "leases": out_by_key[(name, k.index)],
                            "granted": self.given.get((name, k.index), 0),
                            "sent": k.sent, "throttled": k.throttled}
                    for k in pool.keys
                }  # fmt: skip
        return out

    def held(self) -> dict[str, int]:
        """Leases held per worker (for tests and operators)."""
        out: dict[str, int] = {}
        for who, _, _ in self.leases.values():
            out[who] = out.get(who, 0) + 1
        return out

    def pid(self) -> int:
        return os.getpid()


Limiter = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)(LimiterState)


def admitter(spec: tuple[int, float | None, float | None] | EndpointConfig) -> Admission | KeyPool:
    """An endpoint's admission, built as a single process builds it (``engine.request.lane.Lane``):
    ``(concurrency, rpm, tpm)`` is one key's ``Admission``; a config with ``keys`` its ``KeyPool``
    (each key's admission, the groups' and the endpoint's gates: every worker shares them)."""
    if isinstance(spec, EndpointConfig):
        return KeyPool(spec) if spec.pooled else Admission(spec.concurrency, spec.rpm, spec.tpm)
    return Admission(*spec)


def limiter_spec(cfg: EndpointConfig, name: str) -> tuple[int, float | None, float | None] | EndpointConfig:
    """What the limiter actor is sent of endpoint ``name``: its limits, or for a key pool its
    config without ``headers`` (the keys' variable names and limits travel; never a key, which
    the workers read from their own environment)."""
    if cfg.pooled:
        return msgspec.structs.replace(cfg, headers={}, name=name)
    return (cfg.concurrency, cfg.rpm, cfg.tpm)


def key_of(admission: Admission | KeyPool, lease: Any) -> int:
    """The pool key index a lease goes out with (0 for one key)."""
    return admission.key_of(lease)


def start_empty(admission: Admission | KeyPool) -> None:
    """Configured RPM/TPM buckets start empty at the first request, not full: a full bucket
    lets one second's worth go at once on top of the steady rate (the first 10 s window at 3,000
    rpm carried 1.09x the limit), and a limiter Ray restarted does not know what its predecessor
    just let through. (Emptied at the first ask, not when built: the workers start meanwhile;
    and by ``hold(now, now)``, which refills to now before it empties: emptying what was left at
    the last refill, as this did before, let the refill since the limiter was built, a full
    bucket, go at the first request.)"""
    now = time.monotonic()
    if isinstance(admission, KeyPool):  # every key's buckets, and the groups' and endpoint's gates
        for key in admission.keys:
            start_empty(key.admission)
        buckets: list[TokenBucket | None] = list(admission.shared_buckets())
    else:
        buckets = [admission.requests, admission.tokens]
    for bucket in buckets:
        if bucket is not None:
            bucket.hold(now, now)


class AdmissionProxy:
    """``Admission``'s interface in a worker, backed by the ``Limiter`` actor (batched calls)."""

    def __init__(self, limiter: Any, worker: str, endpoint: str, keys: int = 1):
        """``keys``: the size of the endpoint's key pool (1: one key, or none)."""
        self.limiter = limiter
        self.worker = worker
        self.endpoint = endpoint
        self.size = keys
        self._ids = itertools.count()
        # request id -> (est tokens, affinity, its caller's future); not yet sent / in the limiter's queue
        self._queued: dict[int, tuple[float, int, asyncio.Future[int] | None]] = {}
        self._sent: dict[int, tuple[float, int, asyncio.Future[int] | None]] = {}
        self._keys: dict[int, int] = {}  # lease id -> its pool key, where not key 0
        self._retired: set[int] = set()  # pool keys this worker told the limiter were refused
        self._cancel: list[int] = []  # sent requests served by a lent lease: dropped at the limiter
        self._pump: asyncio.Task[None] | None = None
        self._releases: list[tuple[int, int, dict[str, str] | None, float | None]] = []
        self._flush_timer: asyncio.TimerHandle | None = None
        self._rpm: float | None = None
        self._lend_open = False  # the limiter's last word: the endpoint has only its cap in force
        self._closed = 0.0  # when an outcome here last closed lending
        self._lent: dict[int, float] = {}  # held lease id -> end of its term (time.monotonic)
        self._absorbed = 0  # plain 2xx outcomes absorbed by lent leases, not yet told
        self._handing: list[tuple[int, int, Mapping[str, str] | None, float | None]] = []  # to reuse
        self.round_trips = 0  # acquire round trips that came back
        self.granted = 0  # leases they brought
        self.release_calls = 0  # release messages sent
        self.reused = 0  # calls that ran on a lent lease, without a round trip

    def __repr__(self) -> str:
        return f"AdmissionProxy({self.worker!r}, {self.endpoint!r})"

    async def acquire(self, est_tokens: float = 0.0, affinity: int = 0) -> int:
        """A lease id; ``AuthError`` when the endpoint's key pool has no key left."""
        if self._handing and self._lend_open:  # a call here just ended on a lent lease: go on with it
            lease = self._handing.pop()[0]
            self._absorb()
            return lease
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        req = next(self._ids)
        self._queued[req] = (est_tokens, affinity, fut)
        if self._pump is None or self._pump.done():
            self._pump = asyncio.create_task(self._run())
        try:
            return await fut
        except asyncio.CancelledError:
            self._queued.pop(req, None)
            if req in self._sent:  # the limiter may grant it later: give that lease back then
                self._sent[req] = (*self._sent[req][:2], None)
            raise

    async def _run(self) -> None:
        """One round trip at a time while anything waits."""
        while self._queued or self._sent:
            new = [(req, est, aff) if aff else (req, est) for req, (est, aff, _) in self._queued.items()]
            self._sent.update(self._queued)
            self._queued.clear()
            asked = time.monotonic()
            try:
                granted, self._rpm, lend_s = await self.limiter.acquire.remote(
                    self.worker, self.endpoint, new
                )
            except ray.exceptions.RayError:  # restarting: what it had queued is lost, send again
                self._queued.update(self._sent)
                self._sent.clear()
                self._lent.clear()  # the new incarnation never lent them: stop reusing
                self._retired.clear()  # its fresh pool retires a refused key when told again
                self._lend_open = False
                await asyncio.sleep(RETRY_S)
                continue
            self.round_trips += 1
            self.granted += len(granted)
            # (an answer to a question asked before our own non-plain outcome reached the limiter
            # does not reopen lending)
            self._lend_open = lend_s > 0 and asked > self._closed + 2 * FLUSH_S
            self._answer(granted, lend_s)

    def _answer(self, granted: list[Grant], lend_s: float) -> None:
        """Hand the limiter's grants to their callers (a refusal as ``AuthError``)."""
        now = time.monotonic()
        for req, lease_id, key, error in granted:
            *_, fut = self._sent.pop(req, (0.0, 0, None))
            if error is not None:
                if fut is not None and not fut.done():
                    fut.set_exception(AuthError(error))
                continue
            # every lease gets a term (a little apart, so they do not all come back at once):
            # one granted while the endpoint was cold is reusable once the limiter says open
            self._lent[lease_id] = now + (lend_s or LEND_S) * random.uniform(0.75, 1.0)
            if key:
                self._keys[lease_id] = key
            if fut is not None and not fut.done():
                fut.set_result(lease_id)
            else:  # its caller is gone
                self._give_back(lease_id, 0, None, None)

    def release(
        self,
        lease: int,
        status: int,
        headers: Mapping[str, str] | None = None,
        used_tokens: float | None = None,
    ) -> None:
        plain = 200 <= status < 300 and not (
            headers
            and ("x-ratelimit-remaining-requests" in headers or "x-ratelimit-remaining-tokens" in headers)
        )
        if not plain:
            self._lend_open = False  # something to learn: every lease goes back until the limiter says
            self._closed = time.monotonic()
        elif self._lend_open and self._lent.get(lease, 0.0) > time.monotonic():
            self._handing.append((lease, status, headers, used_tokens))
            if len(self._handing) == 1:
                asyncio.get_running_loop().call_soon(self._hand_over)
            return
        self._give_back(lease, status, headers, used_tokens)

    def _hand_over(self) -> None:
        """Lent leases of calls that just ended go to the calls waiting here, one loop turn
        later: by then the task that ended a call has asked for its next one (there is no await
        in between), so it takes the lease it gave up and no request already sent to the
        limiter has to be dropped there. A lease nobody here waits for goes back."""
        handing, self._handing = self._handing, []
        for lease, status, headers, used_tokens in handing:
            if self._lend_open and self._reuse(lease):
                self._absorb()
            else:
                self._give_back(lease, status, headers, used_tokens)

    def _absorb(self) -> None:
        """A plain 2xx outcome stays here (its lease went on to the next call): told in bulk."""
        self._absorbed += 1
        self.reused += 1
        if self._absorbed >= TALLY_EVERY:
            self._schedule_flush(DROP_S)

    def _reuse(self, lease: int) -> bool:
        """Hand a lent lease to the oldest call waiting here (not yet sent, else sent: then the
        limiter is told to drop that request); False when none waits."""
        for pool in (self._queued, self._sent):
            for req, (_, _, fut) in pool.items():
                if fut is None or fut.done():
                    continue
                del pool[req]
                if pool is self._sent:
                    self._cancel.append(req)
                    self._schedule_flush(DROP_S)
                fut.set_result(lease)
                return True
        return False

    def _give_back(
        self, lease: int, status: int, headers: Mapping[str, str] | None, used_tokens: float | None
    ) -> None:
        self._lent.pop(lease, None)
        self._keys.pop(lease, None)
        self._releases.append((lease, status, dict(headers) if headers else None, used_tokens))
        self._schedule_flush()

    def _schedule_flush(self, delay: float = FLUSH_S) -> None:
        """Send what was gathered within ``delay`` (or sooner, if already due sooner)."""
        loop = asyncio.get_running_loop()
        at = loop.time() + delay
        if self._flush_timer is not None:
            if self._flush_timer.when() <= at:
                return
            self._flush_timer.cancel()
        self._flush_timer = loop.call_at(at, self._flush)

    def _flush(self) -> None:
        self._flush_timer = None
        done, self._releases = self._releases, []
        tally = {self.endpoint: self._absorbed} if self._absorbed else None
        dropped = (self.worker, self.endpoint, self._cancel) if self._cancel else None
        self._absorbed, self._cancel = 0, []
        if done or tally or dropped:
            self.release_calls += 1
            with contextlib.suppress(ray.exceptions.RayError):  # a restarting limiter forgot them anyway
                self.limiter.release.remote(done, tally, dropped)

    def key_of(self, lease: int) -> int:
        """The pool key the call of ``lease`` goes out with (0 for one key)."""
        return self._keys.get(lease, 0)

    def retire(self, lease: int) -> tuple[bool, int]:
        """The key of ``lease`` was refused (401/403): the limiter's pool retires it for every
        worker (told at once, ahead of this lease's release and of the call's next acquire).
        Never ``newly``: the driver says it, once for the run (``LimiterState.take_news``). The
        keys left are those this worker knows of (at least the true number: the next acquire
        fails with ``AuthError`` when the pool has none)."""
        key = self.key_of(lease)
        if key not in self._retired:
            self._retired.add(key)
            with contextlib.suppress(ray.exceptions.RayError):
                self.limiter.retire.remote(self.endpoint, lease, key)
        return False, self.size - len(self._retired)

    def effective_rpm(self) -> float | None:
        return self._rpm

    def counters(self) -> dict[str, int]:
        return {
            "round_trips": self.round_trips,
            "granted": self.granted,
            "release_calls": self.release_calls,
            "reused": self.reused,
        }
