"""Global limits: each endpoint's real ``Admission`` in one Ray actor, and the workers' proxy.

``Limiter`` (an async actor, restarted by Ray if it dies) holds one ``engine.admission.Admission``
per endpoint, built from the endpoint's config exactly as a single process would, so the 429
and header learning is the single-process code on one clock. ``AdmissionProxy`` has the same
``acquire`` / ``release`` / ``effective_rpm`` as ``Admission`` and is what a worker's ``Engine``
is given (``Engine(admissions=...)``). It batches:

* acquires: calls waiting locally go to the limiter together, one round trip in flight per
  worker and endpoint; the limiter answers as soon as any of them is granted (or after
  ``HOLD_S``, so requests that queued meanwhile get in line), and keeps the rest waiting in
  its queue for the next round trip;
* releases: gathered for ``FLUSH_S`` and sent as one fire-and-forget message, apart from
  acquires (a release must never wait behind an acquire that it would unblock).

A worker that dies holds leases: the driver calls ``forget(worker)``, which releases them (as
answered: the server may have counted them) and drops its waiting acquires. If the limiter
itself dies, Ray restarts it with fresh admissions (limits are relearned from the next
replies); proxies resubmit what was waiting, and releases of the old incarnation's leases are
ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ray

from engine.admission import Admission, Lease

HOLD_S = 0.25  # longest a limiter round trip waits with nothing granted
LINGER_S = 0.005  # after a first grant, how long a round trip waits for more (bigger batches)
FLUSH_S = 0.003  # releases are gathered this long into one message
RETRY_S = 0.2  # pause before a proxy retries a limiter that is restarting

Limits = dict[str, tuple[int, float | None, float | None]]  # endpoint -> (concurrency, rpm, tpm)


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)
class Limiter:
    """Every endpoint's ``Admission``, once for the whole cluster."""

    def __init__(self, limits: Limits, pid_dir: str | None = None):
        self.admissions = {name: Admission(*lim) for name, lim in limits.items()}
        self.leases: dict[int, tuple[str, str, Lease]] = {}  # lease id -> (worker, endpoint, lease)
        self.waiting: dict[tuple[str, str], dict[int, asyncio.Task[Lease]]] = {}
        self.ready: dict[tuple[str, str], dict[int, asyncio.Task[Lease]]] = {}  # done, not yet handed out
        self.wake: dict[tuple[str, str], asyncio.Event] = {}
        # lease ids unique across restarts, so an old incarnation's lease is never mistaken
        self._ids = itertools.count(random.getrandbits(40) << 20)
        if pid_dir:
            Path(pid_dir).mkdir(parents=True, exist_ok=True)
            (Path(pid_dir) / "limiter").write_text(f"{os.getpid()}\n")

    async def acquire(
        self, worker: str, endpoint: str, new: list[tuple[int, float]]
    ) -> tuple[list[tuple[int, int]], float | None]:
        """Queue ``new`` (request id, est tokens); return the granted (request id, lease id) pairs
        once any of this worker's waiting requests is granted, and the endpoint's target rpm."""
        admission = self.admissions[endpoint]
        key = (worker, endpoint)
        waiting = self.waiting.setdefault(key, {})
        ready = self.ready.setdefault(key, {})
        wake = self.wake.setdefault(key, asyncio.Event())
        for req, est in new:
            task = asyncio.ensure_future(admission.acquire(est))
            waiting[req] = task
            task.add_done_callback(lambda t, req=req: (ready.__setitem__(req, t), wake.set()))
        if waiting and not ready:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(HOLD_S):
                    await wake.wait()
            await asyncio.sleep(LINGER_S)  # the grants a batch of releases frees land together
        wake.clear()
        granted = []
        for req, task in list(ready.items()):
            del ready[req]
            if waiting.pop(req, None) is None or task.cancelled() or task.exception() is not None:
                continue
            lease_id = next(self._ids)
            self.leases[lease_id] = (worker, endpoint, task.result())
            granted.append((req, lease_id))
        return granted, admission.effective_rpm()

    def release(self, done: list[tuple[int, int, dict[str, str] | None, float | None]]) -> None:
        """Give leases back with their outcome (``Admission.release``); unknown ids are ignored."""
        for lease_id, status, headers, used in done:
            item = self.leases.pop(lease_id, None)
            if item is not None:
                self.admissions[item[1]].release(item[2], status, headers, used)

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

    def held(self) -> dict[str, int]:
        """Leases held per worker (for tests and operators)."""
        out: dict[str, int] = {}
        for who, _, _ in self.leases.values():
            out[who] = out.get(who, 0) + 1
        return out

    def pid(self) -> int:
        return os.getpid()


class AdmissionProxy:
    """``Admission``'s interface in a worker, backed by the ``Limiter`` actor (batched calls)."""

    def __init__(self, limiter: Any, worker: str, endpoint: str):
        self.limiter = limiter
        self.worker = worker
        self.endpoint = endpoint
        self._ids = itertools.count()
        self._queued: dict[int, tuple[float, asyncio.Future[int] | None]] = {}  # not yet sent
        self._sent: dict[int, tuple[float, asyncio.Future[int] | None]] = {}  # in the limiter's queue
        self._pump: asyncio.Task[None] | None = None
        self._releases: list[tuple[int, int, dict[str, str] | None, float | None]] = []
        self._flush_soon = False
        self._rpm: float | None = None
        self.round_trips = 0  # acquire round trips that came back
        self.granted = 0  # leases they brought
        self.release_calls = 0  # release messages sent

    def __repr__(self) -> str:
        return f"AdmissionProxy({self.worker!r}, {self.endpoint!r})"

    async def acquire(self, est_tokens: float = 0.0) -> int:
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        req = next(self._ids)
        self._queued[req] = (est_tokens, fut)
        if self._pump is None or self._pump.done():
            self._pump = asyncio.create_task(self._run())
        try:
            return await fut
        except asyncio.CancelledError:
            self._queued.pop(req, None)
            if req in self._sent:  # the limiter may grant it later: give that lease back then
                self._sent[req] = (self._sent[req][0], None)
            raise

    async def _run(self) -> None:
        """One round trip at a time while anything waits."""
        while self._queued or self._sent:
            new = [(req, est) for req, (est, _) in self._queued.items()]
            self._sent.update(self._queued)
            self._queued.clear()
            try:
                granted, self._rpm = await self.limiter.acquire.remote(self.worker, self.endpoint, new)
            except ray.exceptions.RayError:  # restarting: what it had queued is lost, send again
                self._queued.update(self._sent)
                self._sent.clear()
                await asyncio.sleep(RETRY_S)
                continue
            self.round_trips += 1
            self.granted += len(granted)
            for req, lease_id in granted:
                _, fut = self._sent.pop(req, (0.0, None))
                if fut is not None and not fut.done():
                    fut.set_result(lease_id)
                else:  # its caller is gone
                    self._releases.append((lease_id, 0, None, None))
                    self._schedule_flush()

    def release(
        self,
        lease: int,
        status: int,
        headers: Mapping[str, str] | None = None,
        used_tokens: float | None = None,
    ) -> None:
        self._releases.append((lease, status, dict(headers) if headers else None, used_tokens))
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_soon:
            self._flush_soon = True
            asyncio.get_running_loop().call_later(FLUSH_S, self._flush)

    def _flush(self) -> None:
        self._flush_soon = False
        done, self._releases = self._releases, []
        if done:
            self.release_calls += 1
            with contextlib.suppress(ray.exceptions.RayError):
                self.limiter.release.remote(done)  # a restarting limiter forgot them anyway

    def effective_rpm(self) -> float | None:
        return self._rpm

    def counters(self) -> dict[str, int]:
        return {"round_trips": self.round_trips, "granted": self.granted, "release_calls": self.release_calls}
