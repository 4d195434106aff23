"""Anthropic's batch wire on the simulator: ``POST /v1/messages/batches``, ``GET
/v1/messages/batches[/{id}]``, ``GET .../{id}/results`` (JSONL, order not kept) and ``POST
.../{id}/cancel``, shaped after https://docs.anthropic.com/en/api/creating-message-batches.
A refused item is answered as an errored result, as the API does.
"""

from __future__ import annotations

import re
import time
from typing import Any

import orjson
from aiohttp import web

from fairdistill.engine.sim.anthropic import read_params, to_anthropic
from fairdistill.engine.sim.batch import Batch, BatchSim, Result, iso
from fairdistill.engine.sim.keys import org_of
from fairdistill.engine.sim.replies import anthropic_error, caller, json_reply
from fairdistill.engine.sim.strict import Refusal

MAX_ITEMS = 100_000
MAX_BYTES = 256 * 1024**2
_CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_COUNTED = {"ok": "succeeded", "expired": "expired", "canceled": "canceled"}


def result_line(r: Result, model: str) -> bytes:
    """One line of the results: ``{custom_id, result: succeeded | errored | expired | canceled}``."""
    cid, outcome, payload = r
    if outcome == "ok":
        result: dict[str, Any] = {"type": "succeeded", "message": to_anthropic(payload, model)}
    elif outcome in ("expired", "canceled"):
        result = {"type": outcome}
    else:
        kind, msg = "api_error", "Internal server error"
        if outcome != "5xx" and payload is not None:
            kind, msg = "invalid_request_error", payload["error"]["message"]
        result = {"type": "errored", "error": {"type": "error", "error": {"type": kind, "message": msg}}}
    return orjson.dumps({"custom_id": cid, "result": result}) + b"\n"


class AnthropicBatches:
    """The Message Batches routes over a ``BatchSim``."""

    def __init__(self, sim: BatchSim):
        self.sim = sim
        sim.wires["anthropic"] = self

    def mount(self, app: web.Application) -> None:
        r = app.router
        r.add_post("/v1/messages/batches", self.create)
        r.add_get("/v1/messages/batches", self.list_batches)
        r.add_get("/v1/messages/batches/{bid}", self.get)
        r.add_get("/v1/messages/batches/{bid}/results", self.results)
        r.add_post("/v1/messages/batches/{bid}/cancel", self.cancel)

    def running(self, b: Batch) -> None:
        """A message batch is ``in_progress`` from its creation."""

    def ended(self, b: Batch, stop_as: str) -> None:
        counts = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        for _, outcome, _ in b.results:
            counts[_COUNTED.get(outcome, "errored")] += 1
        b.obj.update(
            processing_status="ended",
            request_counts=counts,
            ended_at=iso(b.ended or time.time()),
            results_url=f"{self.sim.core.base_url}/messages/batches/{b.id}/results",
        )

    def _who(self, request: web.Request) -> web.Response | str | None:
        """The organisation of the request's key (None: the simulator has no keys), or the 401."""
        key = caller(self.sim.core.keys, self.sim.core.profile.api_key, request, anthropic=True)
        return key if isinstance(key, web.Response) else org_of(key)

    def _named(self, request: web.Request) -> Batch | web.Response:
        if isinstance(org := self._who(request), web.Response):
            return org
        b = self.sim.named(request.match_info["bid"], "anthropic", org)
        return b if b is not None else anthropic_error(404, "batch not found", "not_found_error")

    def _items(self, raw: bytes, version: str) -> list[tuple[str, dict]]:
        """The requests of a create body (``ValueError`` and co. for a bad one); a refused
        request becomes an item that errors."""
        reqs = orjson.loads(raw)["requests"]
        if not isinstance(reqs, list) or not reqs:
            raise ValueError("requests must be a non-empty list")
        items, seen = [], set()
        for i, r in enumerate(reqs):
            cid = r["custom_id"]
            if not isinstance(cid, str) or not _CUSTOM_ID.match(cid):
                raise ValueError(f"requests.{i}.custom_id: must match ^[a-zA-Z0-9_-]{{1,64}}$")
            if cid in seen:
                raise ValueError(f"requests.{i}.custom_id: duplicate {cid}")
            seen.add(cid)
            try:
                items.append((cid, read_params(self.sim.core, r["params"], version)))
            except Refusal as exc:
                items.append((cid, {"_sim_invalid": str(exc)}))
        return items

    async def create(self, request: web.Request) -> web.Response:
        """``POST /v1/messages/batches`` {requests: [{custom_id, params}]} -> a MessageBatch."""
        if isinstance(org := self._who(request), web.Response):
            return org
        raw = await request.read()
        if len(raw) > MAX_BYTES:
            return anthropic_error(413, "request too large")
        try:
            items = self._items(raw, request.headers.get("anthropic-version", ""))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            return anthropic_error(400, f"invalid batch: {exc}")
        if len(items) > MAX_ITEMS:
            return anthropic_error(400, "more than 100,000 requests")
        b = Batch("anthropic", self.sim.next_id("msgbatch_sim"), items, {}, org)
        counts = {"processing": len(items), "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        b.obj = {
            "id": b.id,
            "type": "message_batch",
            "processing_status": "in_progress",
            "request_counts": counts,
            "ended_at": None,
            "created_at": iso(b.created),
            "expires_at": iso(b.created + 86_400),
            "cancel_initiated_at": None,
            "archived_at": None,
            "results_url": None,
        }
        self.sim.start(b)
        if self.sim.lost():
            return anthropic_error(500, "Internal server error", "api_error")
        return json_reply(b.obj)

    async def get(self, request: web.Request) -> web.Response:
        if isinstance(b := self._named(request), web.Response):
            return b
        return json_reply(b.obj)

    async def results(self, request: web.Request) -> web.Response:
        """``GET {results_url}``: JSONL, one {custom_id, result} per request (order not kept)."""
        if isinstance(b := self._named(request), web.Response):
            return b
        if b.ended is None:
            return anthropic_error(400, "batch is still in progress")
        model = b.items[0][1].get("model", "") if b.items else ""
        data = b"".join(result_line(r, model) for r in reversed(b.results))
        return web.Response(body=self.sim.cut(data), content_type="application/x-jsonl")

    async def cancel(self, request: web.Request) -> web.Response:
        if isinstance(b := self._named(request), web.Response):
            return b
        b.obj["cancel_initiated_at"] = iso(time.time())
        self.sim.cancel(b)
        return json_reply(b.obj)

    async def list_batches(self, request: web.Request) -> web.Response:
        """``GET /v1/messages/batches?limit=&after_id=``: newest first."""
        if isinstance(org := self._who(request), web.Response):
            return org
        return json_reply(
            await self.sim.page("anthropic", "after_id", lambda b: b.obj, {}, request.query, org)
        )
