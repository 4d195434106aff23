"""``fair generate --mode batch``: input lines stream into batches with no coroutine per line.

Each line not yet written becomes a request; a cache hit is written at once; a miss is encoded by
the provider and handed to ``BatchExecutor.enqueue`` with a token. When its batch ends, the
feed's one sink gets ``(token, outcome)``: it decodes the reply, prices it (× ``price_factor``,
through the lane), caches it, emits the request events (stats, trace, progress) and writes the
record. At most ``batch.max_items × batch.max_open`` requests wait at once (per key of a
pool: the lane's admission, ``Unmetered.pick``, chooses each line's key by its prompt prefix, and
every key has batches of its own). A waiting line costs no object of its own: its record id,
start time, key and cache key sit in the parallel containers of ``_Lines`` (the request itself
is a slot in the executor, its body on disk).

Cache-hit marking, pricing, the completed event and the error of a refused reply are the online
engine's own pieces (``engine.request.lane``: ``from_cache``, ``settle``, ``Lane.failure``); only
the loop differs: going through ``Engine.complete`` would cost a coroutine and a future per
waiting line, which is what this feed exists to avoid.
"""

from __future__ import annotations

import asyncio
import time
from array import array
from typing import TYPE_CHECKING, Any, Protocol

from fairdistill.engine.errors import AbortRun, ReplyError, RequestError
from fairdistill.engine.inputs import MAX_REPORTED
from fairdistill.engine.request.batch.keys import KeptAtProvider
from fairdistill.engine.request.cache import cache_key
from fairdistill.engine.request.events import Call
from fairdistill.engine.request.executor import BATCH_HEADER, KEY_HEADER, Reply
from fairdistill.engine.request.lane import affinity_of, from_cache, settle
from fairdistill.engine.request.providers import redact
from fairdistill.engine.rundir.schema import Response
from fairdistill.engine.types import ChatRequest, Message, response_record

if TYPE_CHECKING:
    from fairdistill.engine.request.client import Engine

KEY_BYTES = 32  # a cache key (sha256)


class Lines(Protocol):
    """The input lines to answer (``engine.generate``'s work): the next one not yet written,
    and the counts the run's summary shows."""

    ok: int
    failed: int
    failures: list[str]

    def next(self) -> tuple[str, tuple[Message, ...]] | None: ...


class Records(Protocol):
    """Where the records go (``engine.rundir.store.RunStore``)."""

    def write(self, kind: str, record: Response) -> Any: ...


class Ticker(Protocol):
    """The progress display: one more line done."""

    done: int


class _Lines:
    """The lines waiting in batches, by token: record ids, start times, cache keys (when caching)."""

    def __init__(self, keyed: bool):
        self.ids: list[str | None] = []
        self.started = array("d")
        self.key_index = array("H")  # the pool key it went out with (0: the endpoint's one key)
        self.keys = bytearray() if keyed else None
        self._free = array("i")

    def add(self, record_id: str, key: bytes, key_index: int = 0) -> int:
        now = time.monotonic()
        if self._free:
            token = self._free.pop()
            self.ids[token], self.started[token], self.key_index[token] = record_id, now, key_index
            if self.keys is not None:
                self.keys[token * KEY_BYTES : (token + 1) * KEY_BYTES] = key
        else:
            token = len(self.ids)
            self.ids.append(record_id)
            self.started.append(now)
            self.key_index.append(key_index)
            if self.keys is not None:
                self.keys += key
        return token

    def pop(self, token: int) -> tuple[str, float, bytes | None]:
        """The line's record id, start time and cache key; its token is free again."""
        record_id, self.ids[token] = self.ids[token], None
        self._free.append(token)
        key = None if self.keys is None else bytes(self.keys[token * KEY_BYTES : (token + 1) * KEY_BYTES])
        assert record_id is not None
        return record_id, self.started[token], key


async def feed(
    engine: Engine, endpoint: str, work: Lines, store: Records, bar: Ticker, kind: str, **req: Any
) -> None:
    """Stream ``work``'s lines through the batch executor of ``endpoint``; returns when every
    record is written. Raises the ``AbortRun`` a control call met (refused credentials...), or
    the error writing a record met (a full disk...)."""
    await _Feed(engine, endpoint, work, store, bar, kind).run(req)


class _Feed:
    """One feed: the lines it has waiting, the window it keeps, the records it writes."""

    def __init__(self, engine: Engine, endpoint: str, work: Lines, store: Records, bar: Ticker, kind: str):
        self.lane = lane = engine.lanes[endpoint]
        self.enqueue = engine.executor.enqueue  # type: ignore[attr-defined]  # a BatchExecutor's
        self.events, self.cache = engine.events, engine.cache
        self.work, self.store, self.bar, self.kind = work, store, bar, kind
        self.window = lane.cfg.batch.max_items * lane.cfg.batch.max_open * len(lane.targets)
        self.pick = getattr(lane.admission, "pick", None) if lane.pooled else None  # Unmetered's
        self.room, self.idle = asyncio.Event(), asyncio.Event()
        self.room.set()
        self.idle.set()
        self.pending = 0
        self.aborted: list[BaseException] = []
        self.kept = 0  # lines whose batch waits at the provider under a refused key (no record)
        self.lines = _Lines(keyed=self.cache is not None)

    async def run(self, req: dict[str, Any]) -> None:
        lane, events, cache, work = self.lane, self.events, self.cache, self.work
        while not self.aborted and (item := work.next()) is not None:
            record_id, messages = item
            request = ChatRequest(messages=messages, **req)
            call = Call(lane.name, lane.cfg.model)
            for hook in events.requested:
                hook(call)
            key = cache_key(lane.cfg.provider, lane.cfg.base_url, lane.cache_model, request)
            if cache is not None and (hit := cache.get(key)) is not None:
                self.write(record_id, response_record(record_id, from_cache(events, call, hit)), None)
                continue
            call.attempts = 1
            index = self.pick(affinity_of("", request)) if self.pick is not None else 0
            target = lane.targets[index]
            call.key_env = target.key_env if lane.pooled else None
            for hook in events.sent:
                hook(call)
            token = self.lines.add(record_id, key, index)
            self.pending += 1
            self.idle.clear()
            self.enqueue(target, lane.provider.encode(request), key.hex(), self.sink, token)
            if self.pending >= self.window:
                self.room.clear()
                await self.room.wait()
        await self.idle.wait()
        if self.aborted:
            raise self.aborted[0]
        if self.kept:  # the rest is done: stop unfinished, so a rerun collects those batches
            raise KeptAtProvider(
                f"{self.kept} request(s) have no record: their batches wait at the provider under a "
                "key the Batch API refused (named above); nothing was sent again: run the same "
                "command once that key works to collect them"
            )

    def write(self, record_id: str, record: Response, error: str | None) -> None:
        work = self.work
        if error is None:
            work.ok += 1
        else:
            work.failed += 1
            if len(work.failures) < MAX_REPORTED:
                work.failures.append(f"{record_id}: {error}")
        self.store.write(self.kind, record)
        self.bar.done += 1

    def sink(self, token: int, outcome: Reply | BaseException) -> None:
        """The executor's callback for every line of this feed (it must not raise)."""
        index = self.lines.key_index[token]
        record_id, started, key = self.lines.pop(token)
        self.pending -= 1
        if self.pending < self.window:
            self.room.set()
        if self.pending == 0:
            self.idle.set()
        call = Call(self.lane.name, self.lane.cfg.model)
        call.started, call.attempts = started, 1
        if self.lane.pooled:
            call.key_env = self.lane.targets[index].key_env
        try:
            self.answer(call, record_id, key, outcome)
        except Exception as exc:  # writing the record failed (disk full...): stop the run
            self.aborted.append(exc)

    def answer(self, call: Call, record_id: str, key: bytes | None, outcome: Reply | BaseException) -> None:
        lane, events = self.lane, self.events
        error: Exception | None = None
        if isinstance(outcome, BaseException):
            if isinstance(outcome, KeptAtProvider):  # no record: a rerun collects it
                self.kept += 1
                return
            if isinstance(outcome, AbortRun):
                self.aborted.append(outcome)
                return
            message = redact(f"endpoint {lane.name!r}: {outcome}", lane.secrets)
            error = RequestError(message, endpoint=lane.name)
        else:
            status, raw, headers = outcome
            call.status, call.batch = status, headers.get(BATCH_HEADER)
            call.key_env = headers.get(KEY_HEADER, call.key_env)  # a retired key's went out with another
            if status < 300:
                try:
                    done = lane.provider.decode(raw)
                except ReplyError as e:
                    error = e
            else:
                error = lane.failure(status, raw)
        for hook in events.answered:
            hook(call)
        if error is not None:
            for on_failed in events.failed:
                on_failed(call, error)
            self.write(record_id, Response(id=record_id, error=str(error)), str(error))
            return
        settle(events, lane, call, done)  # latency, attempts (1), price; the completed event
        if key is not None and self.cache is not None:
            self.cache.put(key, done)
        self.write(record_id, response_record(record_id, done), None)
