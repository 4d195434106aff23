"""OpenAI's batch wire on the simulator: ``POST /v1/files`` (multipart, ``purpose=batch``),
``GET /v1/files/{id}/content``, ``POST /v1/batches``, ``GET /v1/batches[/{id}]`` and
``POST /v1/batches/{id}/cancel``, shaped after https://platform.openai.com/docs/api-reference/batch.
A batch whose input has a bad line fails validation: status ``failed`` with ``errors.data[].line``.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from aiohttp import web

from fairdistill.engine.sim.batch import Batch, BatchSim, Result
from fairdistill.engine.sim.keys import org_of
from fairdistill.engine.sim.replies import caller, json_reply, openai_error

MAX_ITEMS = 50_000
MAX_BYTES = 200 * 1024**2
_ENDED = {"expired": "expired", "canceled": "cancelled"}
_ENDED_AT = {"completed": "completed_at", "expired": "expired_at", "cancelled": "cancelled_at"}


def _invalid(message: str) -> web.Response:
    return openai_error(400, message, "invalid_request_error")


def read_lines(data: bytes, endpoint: str) -> tuple[list[tuple[str, dict]], list[dict]]:
    """The items of an input file and its validation errors (``{code, message, line}``)."""
    items: list[tuple[str, dict]] = []
    errors: list[dict] = []
    seen: set[str] = set()
    for lineno, raw in enumerate(data.splitlines(), 1):
        try:
            line = orjson.loads(raw)
            cid, req = line["custom_id"], line["body"]
            ok = line.get("url") == endpoint and isinstance(cid, str) and isinstance(req, dict)
        except (orjson.JSONDecodeError, KeyError, TypeError):
            ok = False
        if not ok:
            errors.append({"code": "invalid_request", "message": "not a batch request line", "line": lineno})
        elif cid in seen:
            errors.append(
                {"code": "duplicate_custom_id", "message": f"custom_id {cid} repeated", "line": lineno}
            )
        else:
            seen.add(cid)
            items.append((cid, req))
    if len(items) > MAX_ITEMS:
        errors.append({"code": "too_many_requests", "message": "more than 50,000 requests", "line": None})
    return items, errors


def output_line(b: Batch, i: int, r: Result) -> bytes:
    """One line of the output (answered items) or error file (the rest)."""
    cid, outcome, payload = r
    line: dict[str, Any] = {"id": f"batch_req_{b.id}_{i}", "custom_id": cid, "response": None, "error": None}
    if outcome == "ok" or outcome.isdigit():
        status = int(outcome) if outcome.isdigit() else 200
        line["response"] = {"status_code": status, "request_id": f"req_{i}", "body": payload}
    elif outcome == "5xx":
        error = {"message": "The server had an error processing this request.", "type": "server_error"}
        line["response"] = {"status_code": 500, "request_id": f"req_{i}", "body": {"error": error}}
    else:
        code = "batch_expired" if outcome == "expired" else "batch_cancelled"
        line["error"] = {"code": code, "message": f"This request was not executed: the batch was {outcome}."}
    return orjson.dumps(line) + b"\n"


class OpenAIBatches:
    """The OpenAI files and batches routes over a ``BatchSim``."""

    def __init__(self, sim: BatchSim):
        self.sim = sim
        sim.wires["openai"] = self

    def mount(self, app: web.Application) -> None:
        r = app.router
        r.add_post("/v1/files", self.upload)
        r.add_get("/v1/files/{fid}/content", self.file_content)
        r.add_post("/v1/batches", self.create)
        r.add_get("/v1/batches", self.list_batches)
        r.add_get("/v1/batches/{bid}", self.get)
        r.add_post("/v1/batches/{bid}/cancel", self.cancel)

    def running(self, b: Batch) -> None:
        b.obj.update(status="in_progress", in_progress_at=int(time.time()))

    def ended(self, b: Batch, stop_as: str) -> None:
        ok = sum(o == "ok" for _, o, _ in b.results)
        status = _ENDED.get(stop_as, "completed")
        out = b"".join(output_line(b, i, r) for i, r in enumerate(b.results) if r[1] == "ok")
        err = b"".join(output_line(b, i, r) for i, r in enumerate(b.results) if r[1] != "ok")
        b.obj.update(
            status=status,
            output_file_id=self.sim.store_file(out, org=b.org) if out else None,
            error_file_id=self.sim.store_file(err, org=b.org) if err else None,
            request_counts={"total": len(b.results), "completed": ok, "failed": len(b.results) - ok},
        )
        b.obj[_ENDED_AT[status]] = int(b.ended or time.time())

    def _who(self, request: web.Request) -> web.Response | str | None:
        """The organisation of the request's key (None: the simulator has no keys), or the 401."""
        key = caller(self.sim.core.keys, self.sim.core.profile.api_key, request, anthropic=False)
        return key if isinstance(key, web.Response) else org_of(key)

    def _named(self, request: web.Request) -> Batch | web.Response:
        if isinstance(org := self._who(request), web.Response):
            return org
        b = self.sim.named(request.match_info["bid"], "openai", org)
        return b if b is not None else openai_error(404, "No such batch", "invalid_request_error")

    async def upload(self, request: web.Request) -> web.Response:
        """``POST /v1/files`` multipart: ``purpose=batch`` and ``file`` -> a File object."""
        if isinstance(org := self._who(request), web.Response):
            return org
        form = await request.post()
        if form.get("purpose") != "batch":
            return _invalid("purpose must be 'batch'")
        field = form.get("file")
        if field is None or not isinstance(field, web.FileField):
            return _invalid("'file' is required")
        data = field.file.read()
        if len(data) > MAX_BYTES:
            return _invalid("file is larger than 200 MB")
        return json_reply(
            {
                "id": self.sim.store_file(data, org=org),
                "object": "file",
                "bytes": len(data),
                "created_at": int(time.time()),
                "filename": field.filename,
                "purpose": "batch",
                "status": "processed",
                "expires_at": None,
                "status_details": None,
            }
        )

    async def file_content(self, request: web.Request) -> web.Response:
        """``GET /v1/files/{id}/content``: the raw JSONL."""
        if isinstance(org := self._who(request), web.Response):
            return org
        data = self.sim.file(request.match_info["fid"], org)
        if data is None:
            return openai_error(404, "No such File object", "invalid_request_error")
        return web.Response(body=self.sim.cut(data), content_type="application/jsonl")

    async def create(self, request: web.Request) -> web.Response:
        """``POST /v1/batches`` {input_file_id, endpoint, completion_window, metadata}."""
        if isinstance(org := self._who(request), web.Response):
            return org
        try:
            body = orjson.loads(await request.read())
            fid, endpoint = body["input_file_id"], body["endpoint"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return _invalid("input_file_id and endpoint are required")
        if endpoint != "/v1/chat/completions" or body.get("completion_window", "24h") != "24h":
            return _invalid("only /v1/chat/completions with completion_window 24h")
        data = self.sim.file(fid, org) if isinstance(fid, str) else None
        if data is None:
            return openai_error(404, f"No such File object: {fid}", "invalid_request_error")
        items, errors = read_lines(data, endpoint)
        b = Batch("openai", self.sim.next_id("batch_sim"), items, body.get("metadata") or {}, org)
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
            self.sim.failed(b)
            b.obj.update(
                status="failed", failed_at=int(b.ended or 0), errors={"object": "list", "data": errors}
            )
        else:
            self.sim.start(b)
        if self.sim.lost():
            return openai_error(500, "The server had an error while processing your request.", "server_error")
        return json_reply(b.obj)

    async def get(self, request: web.Request) -> web.Response:
        if isinstance(b := self._named(request), web.Response):
            return b
        return json_reply(b.obj)

    async def cancel(self, request: web.Request) -> web.Response:
        if isinstance(b := self._named(request), web.Response):
            return b
        self.sim.cancel(b)
        return json_reply(b.obj)

    async def list_batches(self, request: web.Request) -> web.Response:
        """``GET /v1/batches?limit=&after=``: newest first."""
        if isinstance(org := self._who(request), web.Response):
            return org
        return json_reply(
            await self.sim.page("openai", "after", lambda b: b.obj, {"object": "list"}, request.query, org)
        )
