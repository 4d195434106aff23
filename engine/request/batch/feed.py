"""``fair generate --mode batch``: input lines stream into batches with no coroutine per line.

Each line not yet written becomes a request; a cache hit is written at once; a miss is encoded by
the provider and handed to ``BatchExecutor.enqueue`` with a token. When its batch ends, the
feed's one sink gets ``(token, outcome)``: it decodes the reply, prices it (× ``price_factor``,
through the lane), caches it, emits the request events (stats, trace, progress) and writes the
record. At most ``batch.max_items × batch.max_open`` requests wait at once. A waiting line
costs no object of its own: its record id, start time and cache key sit in the parallel
containers of ``_Lines`` (the request itself is a slot in the executor, its body on disk).
"""

from __future__ import annotations

import asyncio
import time
from array import array
from typing import TYPE_CHECKING, Any

from engine.errors import AbortRun, ReplyError, RequestError
from engine.request.cache import cache_key
from engine.request.events import Call
from engine.request.executor import BATCH_HEADER, Reply
from engine.request.providers import error_message, redact
from engine.rundir.schema import Response
from engine.types import ChatRequest

if TYPE_CHECKING:
    from engine.request.client import Engine

KEY_BYTES = 32  # a cache key (sha256)


class _Lines:
    """The lines waiting in batches, by token: record ids, start times, cache keys (when caching)."""

    def __init__(self, keyed: bool):
        self.ids: list[str | None] = []
        self.started = array("d")
        self.keys = bytearray() if keyed else None
        self._free = array("i")

    def add(self, record_id: str, key: bytes) -> int:
        now = time.monotonic()
        if self._free:
            token = self._free.pop()
            self.ids[token], self.started[token] = record_id, now
            if self.keys is not None:
                self.keys[token * KEY_BYTES : (token + 1) * KEY_BYTES] = key
        else:
            token = len(self.ids)
            self.ids.append(record_id)
            self.started.append(now)
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


async def feed(engine: Engine, endpoint: str, work: Any, store: Any, bar: Any, kind: str, **req: Any) -> None:
    """Stream ``work``'s lines through the batch executor of ``endpoint``; returns when every
    record is written. Raises the ``AbortRun`` a control call met (refused credentials...), or
    the error writing a record met (a full disk...)."""
    from engine.generate import MAX_REPORTED_BAD_LINES

    lane = engine.lanes[endpoint]
    enqueue = engine.executor.enqueue  # type: ignore[attr-defined]  # a BatchExecutor's
    events, cache = engine.events, engine.cache
    model = lane.cfg.model
    window = lane.cfg.batch.max_items * lane.cfg.batch.max_open
    room, idle = asyncio.Event(), asyncio.Event()
    room.set()
    idle.set()
    pending = 0
    aborted: list[BaseException] = []
    lines = _Lines(keyed=cache is not None)

    def write(record_id: str, record: Response, error: str | None) -> None:
        if error is None:
            work.ok += 1
        else:
            work.failed += 1
            if len(work.failures) < MAX_REPORTED_BAD_LINES:
                work.failures.append(f"{record_id}: {error}")
        store.write(kind, record)
        bar.done += 1

    def answer(call: Call, record_id: str, key: bytes | None, outcome: Reply | BaseException) -> None:
        error: Exception | None = None
        if isinstance(outcome, BaseException):
            if isinstance(outcome, AbortRun):
                aborted.append(outcome)
                return
            error = RequestError(redact(f"endpoint {endpoint!r}: {outcome}", lane.key), endpoint=endpoint)
        else:
            status, raw, headers = outcome
            call.status, call.batch = status, headers.get(BATCH_HEADER)
            if status < 300:
                try:
                    done = lane.provider.decode(raw)
                except ReplyError as e:
                    error = e
            else:
                msg = f"endpoint {endpoint!r}: HTTP {status}: {error_message(raw, lane.key)}"
                error = RequestError(msg, status=status, endpoint=endpoint)
        for hook in events.answered:
            hook(call)
        if error is not None:
            for hook in events.failed:
                hook(call, error)
            write(record_id, Response(id=record_id, error=str(error)), str(error))
            return
        u = done.usage
        done.latency_s, done.attempts = call.elapsed_s, 1
        done.cost_usd = u.prompt_tokens * lane.price_in + u.completion_tokens * lane.price_out
        if key is not None and cache is not None:
            cache.put(key, done)
        for hook in events.completed:
            hook(call, done)
        write(record_id, _record(record_id, done), None)

    def sink(token: int, outcome: Reply | BaseException) -> None:
        """The executor's callback for every line of this feed (it must not raise)."""
        nonlocal pending
        record_id, started, key = lines.pop(token)
        pending -= 1
        if pending < window:
            room.set()
        if pending == 0:
            idle.set()
        call = Call(endpoint, model)
        call.started, call.attempts = started, 1
        try:
            answer(call, record_id, key, outcome)
        except Exception as exc:  # writing the record failed (disk full...): stop the run
            aborted.append(exc)

    while not aborted and (item := work.next()) is not None:
        record_id, messages = item
        request = ChatRequest(messages=messages, **req)
        call = Call(endpoint, model)
        for hook in events.requested:
            hook(call)
        key = cache_key(lane.cfg.provider, lane.cfg.base_url, model, request)
        if cache is not None and (hit := cache.get(key)) is not None:
            hit.cached, hit.cost_usd, hit.latency_s, hit.attempts = True, 0.0, 0.0, 0
            call.status = 200
            for hook in events.cached:
                hook(call, hit)
            write(record_id, _record(record_id, hit), None)
            continue
        call.attempts = 1
        for hook in events.sent:
            hook(call)
        token = lines.add(record_id, key)
        pending += 1
        idle.clear()
        enqueue(lane, lane.provider.encode(request), key.hex(), sink, token)
        if pending >= window:
            room.clear()
            await room.wait()
    await idle.wait()
    if aborted:
        raise aborted[0]


def _record(record_id: str, done: Any) -> Response:
    return Response(
        id=record_id,
        texts=[c.text for c in done.choices],
        finish_reasons=[c.finish_reason for c in done.choices],
        prompt_tokens=done.usage.prompt_tokens,
        completion_tokens=done.usage.completion_tokens,
    )
