"""``fair generate --mode batch``: input lines stream into batches with no coroutine per line.

Each line not yet written becomes a request; a cache hit is written at once; a miss is encoded by
the provider and handed to ``BatchExecutor.enqueue``, whose future carries a callback that decodes
the reply, prices it (× ``price_factor``, through the lane), caches it, emits the request events
(stats, trace, progress) and writes the record. At most ``batch.max_items × batch.max_open``
requests wait at once; memory per waiting request is a few small objects (its body waits in the
executor's spool file on disk).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from engine.errors import AbortRun, ReplyError, RequestError
from engine.request.cache import cache_key
from engine.request.events import Call
from engine.request.executor import BATCH_HEADER
from engine.request.providers import error_message, redact
from engine.rundir.schema import Response
from engine.types import ChatRequest

if TYPE_CHECKING:
    from engine.request.client import Engine


async def feed(engine: Engine, endpoint: str, work: Any, store: Any, bar: Any, kind: str, **req: Any) -> None:
    """Stream ``work``'s lines through the batch executor of ``endpoint``; returns when every
    record is written. Raises the ``AbortRun`` a control call met (refused credentials...)."""
    from engine.generate import MAX_REPORTED_BAD_LINES

    lane = engine.lanes[endpoint]
    executor = engine.executor
    events, cache = engine.events, engine.cache
    window = lane.cfg.batch.max_items * lane.cfg.batch.max_open
    room, idle = asyncio.Event(), asyncio.Event()
    room.set()
    idle.set()
    pending = 0
    aborted: list[BaseException] = []

    def write(record_id: str, record: Response, error: str | None) -> None:
        if error is None:
            work.ok += 1
        else:
            work.failed += 1
            if len(work.failures) < MAX_REPORTED_BAD_LINES:
                work.failures.append(f"{record_id}: {error}")
        store.write(kind, record)
        bar.done += 1

    def finish(call: _Waiting, fut: asyncio.Future) -> None:
        nonlocal pending
        record_id, key = call.record_id, call.key
        pending -= 1
        if pending < window:
            room.set()
        if pending == 0:
            idle.set()
        if fut.cancelled():
            return
        error: Exception | None = None
        exc = fut.exception()
        if exc is not None:
            if isinstance(exc, AbortRun):
                aborted.append(exc)
                return
            error = RequestError(redact(f"endpoint {endpoint!r}: {exc}", lane.key), endpoint=endpoint)
        else:
            status, raw, headers = fut.result()
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

    while not aborted and (item := work.next()) is not None:
        record_id, messages = item
        request = ChatRequest(messages=messages, **req)
        call = _Waiting(endpoint, lane.cfg.model)
        call.record_id, call.key, call.finish = record_id, None, finish
        for hook in events.requested:
            hook(call)
        key = cache_key(lane.cfg.provider, lane.cfg.base_url, lane.cfg.model, request)
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
        fut = executor.enqueue(lane, lane.provider.encode(request), key.hex())  # type: ignore[attr-defined]
        pending += 1
        idle.clear()
        call.key = key if cache is not None else None  # kept only to cache the answer
        fut.add_done_callback(call)  # one small object per waiting line: no task, no closure
        if pending >= window:
            room.clear()
            await room.wait()
    await idle.wait()
    if aborted:
        raise aborted[0]


class _Waiting(Call):
    """A call waiting in a batch, and the callback its future runs when the batch ends."""

    __slots__ = ("finish", "key", "record_id")

    def __call__(self, fut: asyncio.Future) -> None:
        self.finish(self, fut)


def _record(record_id: str, done: Any) -> Response:
    return Response(
        id=record_id,
        texts=[c.text for c in done.choices],
        finish_reasons=[c.finish_reason for c in done.choices],
        prompt_tokens=done.usage.prompt_tokens,
        completion_tokens=done.usage.completion_tokens,
    )
