"""The simulator's batch routes (OpenAI files + batches, Anthropic message batches, Gemini batch
mode under ``/v1beta``) and Anthropic's online ``/v1/messages`` and Gemini's online
``/v1beta/models/M:generateContent``, so each provider has an online and a batch twin on one server
(a Gemini endpoint's base URL is ``{sim.url}/v1beta``).

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
``errors.data[].line``; Gemini: ``BATCH_STATE_FAILED`` with an Operation ``error`` {code 3, message
naming the line}, the simulator's own wording: Google documents no shape for it).

Gemini: the Files API's resumable upload (``POST /upload/v1beta/files`` start -> ``X-Goog-Upload-URL``
-> ``upload, finalize``), ``POST /v1beta/models/M:batchGenerateContent`` with
``input_config.file_name``, ``GET /v1beta/batches[/ID]``, ``POST /v1beta/batches/ID:cancel``, and
``GET /download/v1beta/files/F:download?alt=media`` (lines ``{"key", "response" | "error"}``; items
an expiry or a cancel stopped have no line). Credentials: ``x-goog-api-key``.

Shapes follow https://platform.openai.com/docs/api-reference/batch,
https://docs.anthropic.com/en/api/creating-message-batches and https://ai.google.dev/api/batch-mode
(see each handler).
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
GEMINI_MAX_BYTES = 2 * 1024**3
_GEMINI_TYPE = "type.googleapis.com/google.ai.generativelanguage.v1beta."
_GEMINI_STATE = {"": "SUCCEEDED", "expired": "EXPIRED", "canceled": "CANCELLED"}
_GEMINI_FINISH = {"stop": "STOP", "length": "MAX_TOKENS"}
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
        self.kind = kind  # "openai" | "anthropic" | "gemini"
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
        self.uploads: dict[str, str] = {}  # Gemini resumable upload id -> the file's display name
        self.batches: dict[str, _Batch] = {}
        self._serial = 0

    def _next(self, prefix: str) -> str:
        self._serial += 1
        return f"{prefix}{self._serial:06d}"

    # -- shared item path ---------------------------------------------------------------------

    def answer(self, body: dict) -> tuple[int, dict]:
        """One chat body (OpenAI shape) through the online content path: (status, payload)."""
        srv = self.server
        if "_sim_invalid" in body:  # a Gemini request the simulator could not read
            return 400, {"error": {"message": body["_sim_invalid"], "type": "invalid_request_error"}}
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
        elif b.kind == "gemini":
            b.obj["metadata"].update(state="BATCH_STATE_RUNNING", updateTime=_iso(time.time()))

    def _set_ended(self, b: _Batch, stop_as: str) -> None:
        outcomes = [o for _, o, _ in b.results]
        if b.kind == "gemini":
            self._set_ended_gemini(b, stop_as)
        elif b.kind == "openai":
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

    def _set_ended_gemini(self, b: _Batch, stop_as: str) -> None:
        """The Operation of an ended batch: its state, counts and ``responsesFile`` (the lines of
        the items processed, newest first: the order is not kept)."""
        lines = [_gemini_line(r) for r in reversed(b.results) if r[1] not in ("expired", "canceled")]
        ok = sum(o == "ok" for _, o, _ in b.results)
        meta = b.obj["metadata"]
        meta.update(
            state=f"BATCH_STATE_{_GEMINI_STATE[stop_as]}",
            updateTime=_iso(time.time()),
            endTime=_iso(b.ended or time.time()),
            batchStats={
                "requestCount": str(len(b.items)),
                "successfulRequestCount": str(ok),
                "failedRequestCount": str(len(lines) - ok),
                "pendingRequestCount": "0",
            },
        )
        b.obj["done"] = True
        if lines:
            fid = "files/batch-" + self._next("sim")
            self.files[fid] = b"".join(lines)
            meta["output"] = {"responsesFile": fid}
            b.obj["response"] = {"@type": _GEMINI_TYPE + "GenerateContentBatchOutput", "responsesFile": fid}

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

    async def _page(
        self, request: web.Request, kind: str, cursor: str, view, extra: dict, query=None
    ) -> dict:
        if self.faults.slow_list_s > 0:
            await asyncio.sleep(self.faults.slow_list_s)
        query = request.query if query is None else query
        try:
            limit = max(1, min(100, int(query.get("limit", "20"))))
        except ValueError:
            limit = 20
        rows = [b for b in reversed(self.batches.values()) if b.kind == kind]
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

    # -- Gemini routes ------------------------------------------------------------------------

    def _gemini_refused(self, request: web.Request) -> web.Response | None:
        """Google's answers: no key is 403 PERMISSION_DENIED; a wrong one is a 400 whose details
        carry the reason ``API_KEY_INVALID``."""
        key, given = self.server.profile.api_key, request.headers.get("x-goog-api-key")
        if key is None or given == key:
            return None
        if given is None:
            return _gemini_error(403, "Method doesn't allow unregistered callers.", "PERMISSION_DENIED")
        info = {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
                "domain": "googleapis.com"}  # fmt: skip
        return _gemini_error(
            400, "API key not valid. Please pass a valid API key.", "INVALID_ARGUMENT", [info]
        )

    async def gemini_model(self, request: web.Request) -> web.Response:
        """``POST /v1beta/models/M:generateContent`` (online) or ``M:batchGenerateContent``."""
        if (refused := self._gemini_refused(request)) is not None:
            return refused
        model, _, verb = request.match_info["call"].rpartition(":")
        if verb == "batchGenerateContent":
            return await self._create_gemini(request, model)
        if verb != "generateContent":
            return _gemini_error(404, f"no method {verb!r}", "NOT_FOUND")
        self.server.stats["requests"] += 1
        try:
            body = from_gemini(orjson.loads(await request.read()), model)
        except (orjson.JSONDecodeError, ValueError, TypeError, KeyError, AttributeError) as exc:
            return _gemini_error(400, f"Invalid JSON payload: {exc}", "INVALID_ARGUMENT")
        delay = self.server._latency_s(self.server._default.profile) if self.server._default else 0.0
        if delay > 0:
            await asyncio.sleep(delay)
        status, payload = self.answer(body)
        if status != 200:
            return _gemini_error(status, payload["error"]["message"], "INVALID_ARGUMENT")
        self.server.stats["ok"] += 1
        return _json(to_gemini(payload))

    async def upload_gemini(self, request: web.Request) -> web.Response:
        """``POST /upload/v1beta/files``, resumable: ``start`` answers ``X-Goog-Upload-URL``; a
        post there with ``upload, finalize`` (offset 0, the whole file) -> ``{"file": {...}}``."""
        if (refused := self._gemini_refused(request)) is not None:
            return refused
        command = request.headers.get("X-Goog-Upload-Command", "").replace(" ", "")
        if command == "start" and request.headers.get("X-Goog-Upload-Protocol") == "resumable":
            try:
                name = orjson.loads(await request.read() or b"{}").get("file", {}).get("display_name", "")
            except (orjson.JSONDecodeError, AttributeError):
                return _gemini_error(400, "Invalid JSON payload received.", "INVALID_ARGUMENT")
            uid = self._next("up")
            self.uploads[uid] = str(name)
            url = f"{self.server.url}/upload/v1beta/files?upload_id={uid}&upload_protocol=resumable"
            return web.Response(
                body=b"", headers={"X-Goog-Upload-URL": url, "X-Goog-Upload-Status": "active"}
            )
        name = self.uploads.pop(request.query.get("upload_id", ""), None)
        if name is None or command != "upload,finalize" or request.headers.get("X-Goog-Upload-Offset") != "0":
            return _gemini_error(
                400, "start a resumable upload, then upload and finalize it", "INVALID_ARGUMENT"
            )
        data = await request.read()
        if len(data) > GEMINI_MAX_BYTES:
            return _gemini_error(400, "file is larger than 2 GB", "INVALID_ARGUMENT")
        fid = "files/" + self._next("sim")
        self.files[fid] = data
        meta = {
            "name": fid,
            "displayName": name,
            "mimeType": "application/jsonl",
            "sizeBytes": str(len(data)),
        }
        return _json({"file": {**meta, "createTime": _iso(time.time()), "state": "ACTIVE"}})

    async def download_gemini(self, request: web.Request) -> web.Response:
        """``GET /download/v1beta/files/F:download?alt=media``: the raw JSONL."""
        if (refused := self._gemini_refused(request)) is not None:
            return refused
        name, _, verb = request.match_info["call"].rpartition(":")
        data = self.files.get(f"files/{name}")
        if verb != "download" or request.query.get("alt") != "media" or data is None:
            return _gemini_error(404, "Requested entity was not found.", "NOT_FOUND")
        return web.Response(body=self._cut(data), content_type="application/jsonl")

    async def _create_gemini(self, request: web.Request, model: str) -> web.Response:
        """``{"batch": {"display_name", "input_config": {"file_name"}}}`` -> an Operation."""
        try:
            batch = orjson.loads(await request.read())["batch"]
            name = batch.get("display_name", batch.get("displayName"))
            cfg = batch.get("input_config", batch.get("inputConfig"))
            fid = cfg.get("file_name", cfg.get("fileName"))
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
            return _gemini_error(400, "batch.display_name and batch.input_config.file_name are required",
                                 "INVALID_ARGUMENT")  # fmt: skip
        if not isinstance(name, str) or not name:
            return _gemini_error(400, "batch.display_name is required", "INVALID_ARGUMENT")
        data = self.files.get(fid) if isinstance(fid, str) else None
        if data is None:
            return _gemini_error(404, f"File {fid} was not found.", "NOT_FOUND")
        items, error, seen = [], None, set()
        for lineno, raw in enumerate(data.splitlines(), 1):
            try:
                line = orjson.loads(raw)
                key, req = line["key"], line["request"]
                ok = isinstance(key, str) and bool(key) and isinstance(req, dict)
            except (orjson.JSONDecodeError, KeyError, TypeError):
                ok = False
            if not ok or key in seen:
                why = f"key {key} repeated" if ok else "not a {key, request} object"
                error = error or {"code": 3, "message": f"Invalid request at line {lineno}: {why}"}
                continue
            seen.add(key)
            try:
                items.append((key, from_gemini(req, model)))
            except (ValueError, TypeError, KeyError, AttributeError) as exc:
                items.append((key, {"_sim_invalid": f"Invalid request: {exc}"}))
        b = _Batch("gemini", self._next("gsim"), items, {"display_name": name})
        now = _iso(b.created)
        b.obj = {
            "name": f"batches/{b.id}",
            "metadata": {
                "@type": _GEMINI_TYPE + "GenerateContentBatch",
                "model": f"models/{model}",
                "displayName": name,
                "inputConfig": {"fileName": fid},
                "createTime": now,
                "updateTime": now,
                "batchStats": {"requestCount": str(len(items)), "pendingRequestCount": str(len(items))},
                "state": "BATCH_STATE_PENDING",
                "name": f"batches/{b.id}",
            },
            "done": False,
        }
        if error is not None:
            self.batches[b.id] = b
            self.server.stats["batches_created"] += 1
            b.ended = time.time()
            b.obj["metadata"].update(state="BATCH_STATE_FAILED", endTime=_iso(b.ended))
            b.obj.update(done=True, error=error)
        else:
            self._start(b)
        if self._lost():
            return _gemini_error(500, "Internal error encountered.", "INTERNAL")
        return _json(b.obj)

    def _gemini_named(self, request: web.Request) -> _Batch | web.Response:
        if (refused := self._gemini_refused(request)) is not None:
            return refused
        b = self.batches.get(request.match_info["bid"].rpartition(":")[0] or request.match_info["bid"])
        if b is not None and b.kind == "gemini":
            return b
        return _gemini_error(404, "Requested entity was not found.", "NOT_FOUND")

    async def get_gemini(self, request: web.Request) -> web.Response:
        if isinstance(b := self._gemini_named(request), web.Response):
            return b
        return _json(b.obj)

    async def cancel_gemini(self, request: web.Request) -> web.Response:
        """``POST /v1beta/batches/ID:cancel`` -> ``{}``."""
        if not request.match_info["bid"].endswith(":cancel"):
            return _gemini_error(404, "no such method", "NOT_FOUND")
        if isinstance(b := self._gemini_named(request), web.Response):
            return b
        self._cancel(b)
        return _json({})

    async def list_gemini(self, request: web.Request) -> web.Response:
        """``GET /v1beta/batches?pageSize=&pageToken=`` -> ``{"operations", "nextPageToken"}``."""
        if (refused := self._gemini_refused(request)) is not None:
            return refused
        query = {"limit": request.query.get("pageSize", "20"), "after": request.query.get("pageToken", "")}
        page = await self._page(request, "gemini", "after", lambda b: b.obj, {}, query)
        out: dict[str, Any] = {"operations": page["data"]}
        if page["has_more"]:
            out["nextPageToken"] = page["last_id"]
        return _json(out)

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


def from_gemini(req: dict, model: str) -> dict:
    """A Gemini GenerateContentRequest -> the OpenAI chat body the content path reads."""
    if not isinstance(req, dict) or not isinstance(req.get("contents"), list) or not req["contents"]:
        raise ValueError("contents: must be a non-empty list")

    def text(content: dict) -> str:
        return "".join(p.get("text", "") for p in content["parts"] if isinstance(p, dict))

    messages = [
        {"role": "assistant" if c.get("role") == "model" else "user", "content": text(c)}
        for c in req["contents"]
    ]
    system = req.get("systemInstruction", req.get("system_instruction"))
    if system:
        messages = [{"role": "system", "content": text(system)}, *messages]
    body: dict[str, Any] = {"model": model, "messages": messages}
    cfg = req.get("generationConfig") or {}
    for theirs, ours in (("temperature", "temperature"), ("maxOutputTokens", "max_tokens"),
                         ("topP", "top_p"), ("candidateCount", "n"), ("seed", "seed"),
                         ("stopSequences", "stop")):  # fmt: skip
        if cfg.get(theirs) is not None:
            body[ours] = cfg[theirs]
    return body


def to_gemini(payload: dict) -> dict:
    """An OpenAI chat completion payload -> a Gemini GenerateContentResponse."""
    u = payload["usage"]
    return {
        "candidates": [
            {
                "content": {"role": "model", "parts": [{"text": c["message"]["content"]}]},
                "finishReason": _GEMINI_FINISH.get(c["finish_reason"], "STOP"),
                "index": c["index"],
            }
            for c in payload["choices"]
        ],
        "usageMetadata": {
            "promptTokenCount": u["prompt_tokens"],
            "candidatesTokenCount": u["completion_tokens"],
            "totalTokenCount": u["total_tokens"],
        },
        "modelVersion": payload.get("model") or "",
        "responseId": payload["id"].replace("chatcmpl-", ""),
    }


def _gemini_line(r: tuple[str, str, Any]) -> bytes:
    """One output line: ``{"key", "response"}`` or ``{"key", "error": <google.rpc.Status>}``."""
    key, outcome, payload = r
    if outcome == "ok":
        return orjson.dumps({"key": key, "response": to_gemini(payload)}) + b"\n"
    if outcome == "5xx":
        error = {"code": 13, "message": "Internal error encountered."}
    else:  # a refused item: INVALID_ARGUMENT (NOT_FOUND for an unknown model)
        error = {"code": 5 if outcome == "404" else 3, "message": payload["error"]["message"]}
    return orjson.dumps({"key": key, "error": error}) + b"\n"


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


def _gemini_error(status: int, message: str, grpc_status: str, details: list | None = None) -> web.Response:
    error: dict[str, Any] = {"code": status, "message": message, "status": grpc_status}
    if details:
        error["details"] = details
    return _json({"error": error}, status)


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
    r.add_post("/v1beta/models/{call}", sim.gemini_model)
    r.add_post("/upload/v1beta/files", sim.upload_gemini)
    r.add_get("/download/v1beta/files/{call}", sim.download_gemini)
    r.add_get("/v1beta/batches", sim.list_gemini)
    r.add_get("/v1beta/batches/{bid}", sim.get_gemini)
    r.add_post("/v1beta/batches/{bid}", sim.cancel_gemini)
    r.add_post("/sim/batch-faults", sim.set_faults)
    return sim
