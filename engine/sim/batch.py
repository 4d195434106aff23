"""The simulator's batch core, shared by the three batch wires (``batch_openai``,
``batch_anthropic``, ``batch_gemini``): uploaded files, batches and the task that answers each
batch's items through the same content path as online calls (``SimCore.answer``), so a batch item
and an online call with the same body get the same text and token counts. Batch items skip the
online hidden limits (providers meter batches separately). ``/stats`` counts ``batches_created``,
``batch_items`` (requests submitted), ``batch_items_billed`` (succeeded items, what a provider
bills), ``batch_prompt_tokens``/``batch_completion_tokens``, ``batch_creates_lost`` and
``batch_downloads_truncated``.

Faults (``BatchFaults``; set them on ``SimServer.batch.faults`` in-process or with
``POST /sim/batch-faults`` and a JSON object): ``start_s`` (slow start), ``turnaround_s``,
``expire_at`` (share of items answered before the batch expires), ``cancel_at`` (an external
cancel after that share), ``p_item_5xx`` (partial item failures), ``lose_create`` (the next N
creates make the batch but answer 500), ``truncate_results`` (the next N result downloads are
cut short), ``slow_list_s``, ``batches`` (the item faults hit only the next N batches).

With ``[keys]`` a batch and a file belong to the organisation of the key that made them: another
organisation's keys get the provider's 404 (``named``, ``file``, ``page`` take the asker's
organisation), and the items read that organisation's prompt cache.

Each wire registers itself (``BatchSim.wires[kind]``) to shape a batch's object when it starts
running and when it ends; the core knows no provider's shapes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

import msgspec
from aiohttp import web

from fairdistill.engine.sim.core import SimCore
from fairdistill.engine.sim.replies import json_reply, openai_error


class BatchFaults(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    start_s: float = 0.0  # the batch sits unprocessed this long (slow start)
    turnaround_s: float = 0.02  # then its items take this long, together
    expire_at: float | None = None  # share answered before the rest expires
    cancel_at: float | None = None  # share answered before an external cancel
    p_item_5xx: float = 0.0  # share of items that fail with a server error
    lose_create: int = 0  # next N creates: batch made, reply 500
    truncate_results: int = 0  # next N result downloads cut in half
    slow_list_s: float = 0.0  # listing batches takes this long (a slow control plane)
    batches: int | None = None  # the item faults above hit only the next N batches (None: all)


def iso(t: float) -> str:
    """An RFC 3339 UTC time with microseconds, as Anthropic and Google write them."""
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


Result = tuple[str, str, Any]  # (custom_id, outcome: ok | expired | canceled | 5xx | HTTP status, payload)


class Batch:
    """One batch: its items (custom_id, chat body in OpenAI shape), results and provider object."""

    __slots__ = ("created", "done", "ended", "id", "items", "kind", "meta", "obj", "org", "results", "task")

    def __init__(
        self, kind: str, bid: str, items: list[tuple[str, dict]], meta: dict, org: str | None = None
    ):
        self.kind = kind  # "openai" | "anthropic" | "gemini"
        self.org = org  # the organisation that made it (None: the simulator has no keys)
        self.id = bid
        self.items = items
        self.meta = meta
        self.created = time.time()
        self.ended: float | None = None
        self.results: list[Result] = []
        self.obj: dict[str, Any] = {}
        self.done = 0
        self.task: asyncio.Task | None = None


class BatchWire(Protocol):
    """What a provider's batch wire tells the core: how its batch object changes."""

    def running(self, b: Batch) -> None: ...

    def ended(self, b: Batch, stop_as: str) -> None: ...


class BatchSim:
    """Batch state of one simulator: files, batches and their processing tasks."""

    def __init__(self, core: SimCore):
        self.core = core
        self.faults = BatchFaults()
        self.files: dict[str, bytes] = {}
        self.owners: dict[str, str] = {}  # file id -> the organisation that owns it (with [keys])
        self.batches: dict[str, Batch] = {}
        self.wires: dict[str, BatchWire] = {}
        self._serial = 0

    def next_id(self, prefix: str) -> str:
        self._serial += 1
        return f"{prefix}{self._serial:06d}"

    def store_file(self, data: bytes, prefix: str = "file-sim", org: str | None = None) -> str:
        fid = self.next_id(prefix)
        self.files[fid] = data
        if org is not None:
            self.owners[fid] = org
        return fid

    def file(self, fid: str, org: str | None) -> bytes | None:
        """File ``fid`` as organisation ``org`` sees it (None: no such file, or another's)."""
        return self.files.get(fid) if self.owners.get(fid) == org else None

    def start(self, b: Batch) -> None:
        """Keep ``b`` and start answering its items."""
        self.batches[b.id] = b
        self.core.stats["batches_created"] += 1
        self.core.stats["batch_items"] += len(b.items)
        b.task = asyncio.get_running_loop().create_task(self._process(b))

    def failed(self, b: Batch) -> None:
        """Keep ``b``, which failed validation: it ends now, unprocessed."""
        self.batches[b.id] = b
        self.core.stats["batches_created"] += 1
        b.ended = time.time()

    def lost(self) -> bool:
        """Whether this create's reply is lost (``lose_create``): the batch exists all the same."""
        if self.faults.lose_create > 0:
            self.faults.lose_create -= 1
            self.core.stats["batch_creates_lost"] += 1
            return True
        return False

    def cut(self, data: bytes) -> bytes:
        """A result download, cut in half while ``truncate_results`` lasts."""
        if self.faults.truncate_results > 0 and data:
            self.faults.truncate_results -= 1
            self.core.stats["batch_downloads_truncated"] += 1
            return data[: len(data) // 2]
        return data

    def cancel(self, b: Batch) -> None:
        """End ``b`` now: the items not answered yet are canceled."""
        if b.ended is not None:
            return
        if b.task is not None:
            b.task.cancel()
        b.results = b.results + [(cid, "canceled", None) for cid, _ in b.items[len(b.results) :]]
        b.ended = time.time()
        self.wires[b.kind].ended(b, "canceled")

    def named(self, bid: str, kind: str, org: str | None = None) -> Batch | None:
        """Batch ``bid`` of wire ``kind`` as organisation ``org`` sees it (None: not found)."""
        b = self.batches.get(bid)
        return b if b is not None and b.kind == kind and b.org == org else None

    # -- processing ---------------------------------------------------------------------------

    def _faults_now(self) -> BatchFaults:
        """The faults of the batch starting now (``batches`` counts down to the plain ones)."""
        f = self.faults
        if f.batches is None:
            return f
        if f.batches <= 0:
            return BatchFaults(start_s=f.start_s, turnaround_s=f.turnaround_s)
        self.faults.batches = f.batches - 1
        return f

    async def _process(self, b: Batch) -> None:
        f = self._faults_now()
        await asyncio.sleep(f.start_s)
        self.wires[b.kind].running(b)
        await asyncio.sleep(f.turnaround_s)
        n = len(b.items)
        stop_at, stop_as = n, ""
        if f.expire_at is not None:
            stop_at, stop_as = int(n * f.expire_at), "expired"
        if f.cancel_at is not None and int(n * f.cancel_at) < stop_at:
            stop_at, stop_as = int(n * f.cancel_at), "canceled"
        for i, (cid, body) in enumerate(b.items):
            if i >= stop_at:
                b.results.append((cid, stop_as, None))
            elif f.p_item_5xx and self.core.rng.random() < f.p_item_5xx:
                b.results.append((cid, "5xx", None))
            else:
                b.results.append(self._answer(cid, body, b.kind, b.org))
                b.done += 1
        b.ended = time.time()
        self.wires[b.kind].ended(b, stop_as)

    def _answer(self, cid: str, body: dict, kind: str, org: str | None) -> Result:
        stats = self.core.stats
        status, payload = self.core.answer(body, kind, org)
        if status != 200:
            return (cid, str(status), payload)
        stats["batch_items_billed"] += 1
        stats["batch_prompt_tokens"] += payload["usage"]["prompt_tokens"]
        stats["batch_completion_tokens"] += payload["usage"]["completion_tokens"]
        return (cid, "ok", payload)

    # -- routes shared by the wires -----------------------------------------------------------

    async def page(
        self,
        kind: str,
        cursor: str,
        view: Callable[[Batch], dict],
        extra: dict,
        query: Mapping[str, str],
        org: str | None = None,
    ) -> dict:
        """One page of organisation ``org``'s ``kind`` batches, newest first: ``limit`` and the
        ``cursor`` id after which."""
        if self.faults.slow_list_s > 0:
            await asyncio.sleep(self.faults.slow_list_s)
        try:
            limit = max(1, min(100, int(query.get("limit", "20"))))
        except ValueError:
            limit = 20
        rows = [b for b in reversed(self.batches.values()) if b.kind == kind and b.org == org]
        after = query.get(cursor)
        if after:
            ids = [b.id for b in rows]
            rows = rows[ids.index(after) + 1 :] if after in ids else []
        page = rows[:limit]
        return {
            **extra,
            "data": [view(b) for b in page],
            "has_more": len(rows) > limit,
            "first_id": page[0].id if page else None,
            "last_id": page[-1].id if page else None,
        }

    async def set_faults(self, request: web.Request) -> web.Response:
        """``POST /sim/batch-faults`` {start_s, expire_at, ...}: replace the batch faults."""
        try:
            self.faults = msgspec.json.decode(await request.read(), type=BatchFaults)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return openai_error(400, str(exc), "invalid_request_error")
        return json_reply(msgspec.to_builtins(self.faults))
