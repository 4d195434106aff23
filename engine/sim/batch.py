"""The simulator's batch routes (OpenAI files + batches, Anthropic message batches) and Anthropic's
online ``/v1/messages``, so each provider has an online and a batch twin on one server.

Items are answered through the same content path as online chat calls (``SimServer._choices``),
so a batch item and an online call with the same body get the same text and token counts. Batch
items skip the online hidden limits (providers meter batches separately). ``/stats`` counts
``batches_created``, ``batch_items`` (requests submitted), ``batch_items_billed`` (succeeded items,
what a provider bills), ``batch_prompt_tokens``/``batch_completion_tokens``, ``batch_creates_lost``
and ``batch_downloads_truncated``.

Faults (``BatchFaults``; set them on ``SimServer.batch.faults`` in-process or with
``POST /sim/batch-faults`` and a JSON object): ``start_s`` (slow start), ``turnaround_s``,
``expire_at`` (share of items answered before the batch expires), ``cancel_at`` (an external
cancel after that share), ``p_item_5xx`` (partial item failures), ``lose_create`` (the next N
creates make the batch but answer 500), ``truncate_results`` (the next N result downloads are
cut short). A batch whose input has a bad line fails validation (OpenAI: status ``failed`` with
``errors.data[].line``).

Shapes follow https://platform.openai.com/docs/api-reference/batch and
https://docs.anthropic.com/en/api/creating-message-batches (see each handler).
"""

from __future__ import annotations

import asyncio
import re
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import msgspec
import orjson
from aiohttp import web

from engine.wire import RequestInvalid, parse_chat_request

if TYPE_CHECKING:
    from engine.sim.server import SimServer

JSON = "application/json"
OPENAI_MAX_ITEMS = 50_000
OPENAI_MAX_BYTES = 200 * 1024**2
ANTHROPIC_MAX_ITEMS = 100_000
ANTHROPIC_MAX_BYTES = 256 * 1024**2
_CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_STOP = {"stop": "end_turn", "length": "max_tokens"}


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


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class _Batch:
    __slots__ = (
        "created",
        "done",
        "ended",
        "errors",
        "id",
        "items",
        "kind",
        "meta",
        "obj",
        "results",
        "task",
    )

    def __init__(self, kind: str, bid: str, items: list[tuple[str, dict]], meta: dict):
        self.kind = kind  # "openai" | "anthropic"
        self.id = bid
        self.items = items  # (custom_id, chat body in OpenAI shape)
        self.meta = meta
        self.created = time.time()
        self.ended: float | None = None
        self.results: list[tuple[str, str, Any]] = []  # (custom_id, outcome, payload)
        self.errors: list[dict] = []  # OpenAI validation errors
        self.obj: dict[str, Any] = {}
        self.done = 0
        self.task: asyncio.Task | None = None


class BatchSim:
    """Batch state of one ``SimServer``: files, batches and their processing tasks."""

    def __init__(self, server: SimServer):
        self.server = server
        self.faults = BatchFaults()
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, _Batch] = {}
        self._serial = 0

    def _next(self, prefix: str) -> str:
        self._serial += 1
        return f"{prefix}{self._serial:06d}"

    # -- shared item path ---------------------------------------------------------------------

    def answer(self, body: dict) -> tuple[int, dict]:
        """One chat body (OpenAI shape) through the online content path: (status, payload)."""
        srv = self.server
        try:
            req = parse_chat_request(body)
        except RequestInvalid as exc:
            return 400, {"error": {"message": str(exc), "type": "invalid_request_error", "param": exc.param}}
        model = srv._models.get(req.model or "") or srv._default
        if model is None:
            return 404, {
                "error": {
                    "message": f"The model `{req.model}` does not exist.",
                    "type": "invalid_request_error",
                }
            }
        from engine.sim.server import _prompt_tokens

        messages = body["messages"]
        n = req.n or 1
        choices, completion = srv._choices(model, body, messages, n, req.limit, None)
        prompt = _prompt_tokens(messages)
        srv._serial += 1
        return 200, {
            "id": f"chatcmpl-sim{srv._serial}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": req.model,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            },
        }

    # -- processing ---------------------------------------------------------------------------

    async def _process(self, b: _Batch) -> None:
        f, stats, rng = self.faults, self.server.stats, self.server._rng
        if f.batches is not None:
            if f.batches <= 0:
                f = BatchFaults(start_s=f.start_s, turnaround_s=f.turnaround_s)
            else:
                self.faults.batches = f.batches - 1
        await asyncio.sleep(f.start_s)
        self._set_running(b)
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
                continue
            if f.p_item_5xx and rng.random() < f.p_item_5xx:
                b.results.append((cid, "5xx", None))
                continue
            status, payload = self.answer(body)
            if status == 200:
                stats["batch_items_billed"] += 1
                stats["batch_prompt_tokens"] += payload["usage"]["prompt_tokens"]
                stats["batch_completion_tokens"] += payload["usage"]["completion_tokens"]
                b.results.append((cid, "ok", payload))
            else:
                b.results.append((cid, str(status), payload))
            b.done += 1
        b.ended = time.time()
        self._set_ended(b, stop_as)

    def _set_running(self, b: _Batch) -> None:
        if b.kind == "openai":
            b.obj.update(status="in_progress", in_progress_at=int(time.time()))

    def _set_ended(self, b: _Batch, stop_as: str) -> None:
        outcomes = [o for _, o, _ in b.results]
        if b.kind == "openai":
            ok = sum(o == "ok" for o in outcomes)
            status = {"expired": "expired", "canceled": "cancelled"}.get(stop_as, "completed")
            out = b"".join(self._openai_line(b, i, r) for i, r in enumerate(b.results) if r[1] == "ok")
            err = b"".join(self._openai_line(b, i, r) for i, r in enumerate(b.results) if r[1] != "ok")
            out_id = self._store_file(out, "batch_output") if out else None
            err_id = self._store_file(err, "batch_output") if err else None
            b.obj.update(
                status=status,
                output_file_id=out_id,
                error_file_id=err_id,
                request_counts={"total": len(outcomes), "completed": ok, "failed": len(outcomes) - ok},
            )
            b.obj[
                {"completed": "completed_at", "expired": "expired_at", "cancelled": "cancelled_at"}[status]
            ] = int(b.ended or time.time())
        else:
            counts = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
            for o in outcomes:
                counts[
                    {"ok": "succeeded", "expired": "expired", "canceled": "canceled"}.get(o, "errored")
                ] += 1
            b.obj.update(
                processing_status="ended",
                request_counts=counts,
                ended_at=_iso(b.ended or time.time()),
                results_url=f"{self.server.base_url}/messages/batches/{b.id}/results",
            )

    def _store_file(self, data: bytes, purpose: str) -> str:
        fid = self._next("file-sim")
        self.files[fid] = data
        return fid

    def _openai_line(self, b: _Batch, i: int, r: tuple[str, str, Any]) -> bytes:
        cid, outcome, payload = r
        line: dict[str, Any] = {
            "id": f"batch_req_{b.id}_{i}",
            "custom_id": cid,
            "response": None,
            "error": None,
        }
        if outcome == "ok" or outcome.isdigit():
            line["response"] = {
                "status_code": int(outcome) if outcome.isdigit() else 200,
                "request_id": f"req_{i}",
                "body": payload,
            }
        elif outcome == "5xx":
            line["response"] = {
                "status_code": 500,
                "request_id": f"req_{i}",
                "body": {
                    "error": {
                        "message": "The server had an error processing this request.",
                        "type": "server_error",
                    }
                },
            }
        else:
            code = "batch_expired" if outcome == "expired" else "batch_cancelled"
            line["error"] = {
                "code": code,
                "message": f"This request was not executed: the batch was {outcome}.",
            }
        return orjson.dumps(line) + b"\n"

    def _anthropic_line(self, r: tuple[str, str, Any], model: str) -> bytes:
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

    def _start(self, b: _Batch) -> None:
        self.batches[b.id] = b
        self.server.stats["batches_created"] += 1
        self.server.stats["batch_items"] += len(b.items)
        b.task = asyncio.get_running_loop().create_task(self._process(b))

    def _lost(self) -> bool:
        if self.faults.lose_create > 0:
            self.faults.lose_create -= 1
            self.server.stats["batch_creates_lost"] += 1
            return True
        return False

    def _cut(self, data: bytes) -> bytes:
        if self.faults.truncate_results > 0 and data:
            self.faults.truncate_results -= 1
            self.server.stats["batch_downloads_truncated"] += 1
            return data[: len(data) // 2]
        return data

    def _cancel(self, b: _Batch) -> None:
        if b.ended is not None:
            return
        if b.task is not None:
            b.task.cancel()
        b.results = b.results + [(cid, "canceled", None) for cid, _ in b.items[len(b.results) :]]
        b.ended = time.time()
        self._set_ended(b, "canceled")

    # -- auth ---------------------------------------------------------------------------------

    def _refused(self, request: web.Request, anthropic: bool) -> web.Response | None:
        key = self.server.profile.api_key
        if key is None:
            return None
        if anthropic and request.headers.get("x-api-key") == key:
            return None
        if not anthropic and request.headers.get("Authorization") == f"Bearer {key}":
            return None
        return _error(
            401, "invalid x-api-key" if anthropic else "Incorrect API key provided.", "authentication_error"
        )

    def _named(self, request: web.Request, kind: str) -> _Batch | web.Response:
        """The ``kind`` batch the route's ``{bid}`` names, or the answer instead (401, or 404 in
        that provider's error shape)."""
        anthropic = kind == "anthropic"
        if (refused := self._refused(request, anthropic)) is not None:
            return refused
        b = self.batches.get(request.match_info["bid"])
        if b is not None and b.kind == kind:
            return b
        if anthropic:
            return _anthropic_error(404, "batch not found", "not_found_error")
        return _error(404, "No such batch", "invalid_request_error")

    # -- OpenAI routes --------------------------------------------------------------------------

    async def upload(self, request: web.Request) -> web.Response:
        """``POST /v1/files`` multipart: ``purpose=batch`` and ``file`` -> a File object."""
        if (refused := self._refused(request, False)) is not None:
            return refused
        form = await request.post()
        if form.get("purpose") != "batch":
            return _error(400, "purpose must be 'batch'", "invalid_request_error")
        field = form.get("file")
        if field is None or not hasattr(field, "file"):
            return _error(400, "'file' is required", "invalid_request_error")
        data = field.file.read()
        if len(data) > OPENAI_MAX_BYTES:
            return _error(400, "file is larger than 200 MB", "invalid_request_error")
        fid = self._store_file(data, "batch")
        return _json(
            {
                "id": fid,
                "object": "file",
                "bytes": len(data),
                "created_at": int(time.time()),
                "filename": getattr(field, "filename", "batch.jsonl"),
                "purpose": "batch",
            }
        )

    async def file_content(self, request: web.Request) -> web.Response:
        """``GET /v1/files/{id}/content``: the raw JSONL."""
        if (refused := self._refused(request, False)) is not None:
            return refused
        data = self.files.get(request.match_info["fid"])
        if data is None:
            return _error(404, "No such File object", "invalid_request_error")
        return web.Response(body=self._cut(data), content_type="application/jsonl")

    async def create_openai(self, request: web.Request) -> web.Response:
        """``POST /v1/batches`` {input_file_id, endpoint, completion_window, metadata}."""
        if (refused := self._refused(request, False)) is not None:
            return refused
        try:
            body = orjson.loads(await request.read())
            fid, endpoint = body["input_file_id"], body["endpoint"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return _error(400, "input_file_id and endpoint are required", "invalid_request_error")
        if endpoint != "/v1/chat/completions" or body.get("completion_window", "24h") != "24h":
            return _error(
                400, "only /v1/chat/completions with completion_window 24h", "invalid_request_error"
            )
        data = self.files.get(fid)
        if data is None:
            return _error(404, f"No such File object: {fid}", "invalid_request_error")
        items, errors, seen = [], [], set()
        for lineno, raw in enumerate(data.splitlines(), 1):
            try:
                line = orjson.loads(raw)
                cid, req = line["custom_id"], line["body"]
                ok = line.get("url") == endpoint and isinstance(cid, str) and isinstance(req, dict)
            except (orjson.JSONDecodeError, KeyError, TypeError):
                ok = False
            if not ok:
                errors.append(
                    {"code": "invalid_request", "message": "not a batch request line", "line": lineno}
                )
            elif cid in seen:
                errors.append(
                    {"code": "duplicate_custom_id", "message": f"custom_id {cid} repeated", "line": lineno}
                )
            else:
                seen.add(cid)
                items.append((cid, req))
        if len(items) > OPENAI_MAX_ITEMS:
            errors.append({"code": "too_many_requests", "message": "more than 50,000 requests", "line": None})
        b = _Batch("openai", self._next("batch_sim"), items, body.get("metadata") or {})
        b.obj = {
            "id": b.id,
            "object": "batch",
            "endpoint": endpoint,
            "errors": None,
            "input_file_id": fid,
            "completion_window": "24h",
            "status": "validating",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": int(b.created),
            "expires_at": int(b.created) + 86_400,
            "request_counts": {"total": len(items), "completed": 0, "failed": 0},
            "metadata": b.meta,
        }
        if errors:
            self.batches[b.id] = b
            self.server.stats["batches_created"] += 1
            b.ended = time.time()
            b.obj.update(status="failed", failed_at=int(b.ended), errors={"object": "list", "data": errors})
        else:
            self._start(b)
        if self._lost():
            return _error(500, "The server had an error while processing your request.", "server_error")
        return _json(b.obj)

    async def get_openai(self, request: web.Request) -> web.Response:
        if isinstance(b := self._named(request, "openai"), web.Response):
            return b
        return _json(b.obj)

    async def cancel_openai(self, request: web.Request) -> web.Response:
        if isinstance(b := self._named(request, "openai"), web.Response):
            return b
        self._cancel(b)
        return _json(b.obj)

    async def list_openai(self, request: web.Request) -> web.Response:
        """``GET /v1/batches?limit=&after=``: newest first."""
        if (refused := self._refused(request, False)) is not None:
            return refused
        return _json(await self._page(request, "openai", "after", lambda b: b.obj, {"object": "list"}))

    # -- Anthropic routes -----------------------------------------------------------------------

    async def messages(self, request: web.Request) -> web.Response:
        """``POST /v1/messages``: Anthropic's online call, answered like a chat completion."""
        if (refused := self._refused(request, True)) is not None:
            return refused
        self.server.stats["requests"] += 1
        try:
            params = orjson.loads(await request.read())
            body = from_anthropic(params)
        except (orjson.JSONDecodeError, ValueError, TypeError, KeyError) as exc:
            return _anthropic_error(400, f"invalid request: {exc}")
        delay = self.server._latency_s(self.server._default.profile) if self.server._default else 0.0
        if delay > 0:
            await asyncio.sleep(delay)
        status, payload = self.answer(body)
        if status != 200:
            return _anthropic_error(status, payload["error"]["message"])
        self.server.stats["ok"] += 1
        return _json(to_anthropic(payload, body.get("model") or ""))

    async def create_anthropic(self, request: web.Request) -> web.Response:
        """``POST /v1/messages/batches`` {requests: [{custom_id, params}]} -> a MessageBatch."""
        if (refused := self._refused(request, True)) is not None:
            return refused
        raw = await request.read()
        if len(raw) > ANTHROPIC_MAX_BYTES:
            return _anthropic_error(413, "request too large")
        try:
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
                items.append((cid, from_anthropic(r["params"])))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            return _anthropic_error(400, f"invalid batch: {exc}")
        if len(items) > ANTHROPIC_MAX_ITEMS:
            return _anthropic_error(400, "more than 100,000 requests")
        b = _Batch("anthropic", self._next("msgbatch_sim"), items, {})
        b.obj = {
            "id": b.id,
            "type": "message_batch",
            "processing_status": "in_progress",
            "request_counts": {
                "processing": len(items),
                "succeeded": 0,
                "errored": 0,
                "canceled": 0,
                "expired": 0,
            },
            "ended_at": None,
            "created_at": _iso(b.created),
            "expires_at": _iso(b.created + 86_400),
            "cancel_initiated_at": None,
            "archived_at": None,
            "results_url": None,
        }
        self._start(b)
        if self._lost():
            return _anthropic_error(500, "Internal server error", "api_error")
        return _json(b.obj)

    async def get_anthropic(self, request: web.Request) -> web.Response:
        if isinstance(b := self._named(request, "anthropic"), web.Response):
            return b
        return _json(b.obj)

    async def results_anthropic(self, request: web.Request) -> web.Response:
        """``GET {results_url}``: JSONL, one {custom_id, result} per request (order not kept)."""
        if isinstance(b := self._named(request, "anthropic"), web.Response):
            return b
        if b.ended is None:
            return _anthropic_error(400, "batch is still in progress")
        model = b.items[0][1].get("model", "") if b.items else ""
        data = b"".join(self._anthropic_line(r, model) for r in reversed(b.results))
        return web.Response(body=self._cut(data), content_type="application/x-jsonl")

    async def cancel_anthropic(self, request: web.Request) -> web.Response:
        if isinstance(b := self._named(request, "anthropic"), web.Response):
            return b
        b.obj["cancel_initiated_at"] = _iso(time.time())
        self._cancel(b)
        return _json(b.obj)

    async def list_anthropic(self, request: web.Request) -> web.Response:
        """``GET /v1/messages/batches?limit=&after_id=``: newest first."""
        if (refused := self._refused(request, True)) is not None:
            return refused
        return _json(await self._page(request, "anthropic", "after_id", lambda b: b.obj, {}))

    async def _page(self, request: web.Request, kind: str, cursor: str, view, extra: dict) -> dict:
        if self.faults.slow_list_s > 0:
            await asyncio.sleep(self.faults.slow_list_s)
        try:
            limit = max(1, min(100, int(request.query.get("limit", "20"))))
        except ValueError:
            limit = 20
        rows = [b for b in reversed(self.batches.values()) if b.kind == kind]
        after = request.query.get(cursor)
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
            return _error(400, str(exc), "invalid_request_error")
        return _json(msgspec.to_builtins(self.faults))


def from_anthropic(params: dict) -> dict:
    """Anthropic Messages params -> the OpenAI chat body the content path reads."""
    if not isinstance(params, dict):
        raise ValueError("params must be an object")
    if not isinstance(params.get("max_tokens"), int):
        raise ValueError("max_tokens: Field required")
    messages = list(params["messages"])
    system = params.get("system")
    if isinstance(system, list):
        system = "".join(p.get("text", "") for p in system if isinstance(p, dict))
    if system:
        messages = [{"role": "system", "content": system}, *messages]
    body = {"model": params.get("model"), "messages": messages, "max_tokens": params["max_tokens"]}
    for k in ("temperature", "top_p"):
        if k in params:
            body[k] = params[k]
    if params.get("stop_sequences"):
        body["stop"] = params["stop_sequences"]
    return body


def to_anthropic(payload: dict, model: str) -> dict:
    """An OpenAI chat completion payload -> an Anthropic Message."""
    c = payload["choices"][0]
    u = payload["usage"]
    return {
        "id": payload["id"].replace("chatcmpl", "msg"),
        "type": "message",
        "role": "assistant",
        "model": payload.get("model") or model,
        "content": [{"type": "text", "text": c["message"]["content"]}],
        "stop_reason": _STOP.get(c["finish_reason"], "end_turn"),
        "stop_sequence": None,
        "usage": {"input_tokens": u["prompt_tokens"], "output_tokens": u["completion_tokens"]},
    }


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(obj), content_type=JSON)


def _error(status: int, message: str, kind: str) -> web.Response:
    return _json({"error": {"message": message, "type": kind, "param": None, "code": None}}, status)


def _anthropic_error(status: int, message: str, kind: str = "invalid_request_error") -> web.Response:
    return _json({"type": "error", "error": {"type": kind, "message": message}}, status)


def mount(server: SimServer, app: web.Application) -> BatchSim:
    """Add the batch routes (and Anthropic's online ``/v1/messages``) to the simulator's app."""
    sim = server.batch if isinstance(getattr(server, "batch", None), BatchSim) else BatchSim(server)
    server.batch = sim  # type: ignore[attr-defined]
    r = app.router
    r.add_post("/v1/files", sim.upload)
    r.add_get("/v1/files/{fid}/content", sim.file_content)
    r.add_post("/v1/batches", sim.create_openai)
    r.add_get("/v1/batches", sim.list_openai)
    r.add_get("/v1/batches/{bid}", sim.get_openai)
    r.add_post("/v1/batches/{bid}/cancel", sim.cancel_openai)
    r.add_post("/v1/messages", sim.messages)
    r.add_post("/v1/messages/batches", sim.create_anthropic)
    r.add_get("/v1/messages/batches", sim.list_anthropic)
    r.add_get("/v1/messages/batches/{bid}", sim.get_anthropic)
    r.add_get("/v1/messages/batches/{bid}/results", sim.results_anthropic)
    r.add_post("/v1/messages/batches/{bid}/cancel", sim.cancel_anthropic)
    r.add_post("/sim/batch-faults", sim.set_faults)
    return sim
