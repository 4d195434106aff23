"""Gemini's batch mode on the simulator, under ``/v1beta`` (a Gemini endpoint's base URL is
``{sim.url}/v1beta``): the Files API's resumable upload (``POST /upload/v1beta/files`` start ->
``X-Goog-Upload-URL`` -> ``upload, finalize``), ``POST /v1beta/models/M:batchGenerateContent`` with
``input_config.file_name``, ``GET /v1beta/batches[/ID]``, ``POST /v1beta/batches/ID:cancel`` and
``GET /download/v1beta/files/F:download?alt=media`` (lines ``{"key", "response" | "error"}``;
items an expiry or a cancel stopped have no line). A batch whose input has a bad line ends
``BATCH_STATE_FAILED`` with an Operation ``error`` {code 3, message naming the line} (the
simulator's own wording: Google documents no shape for it). Shapes follow
https://ai.google.dev/api/batch-mode.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from aiohttp import web

from fairdistill.engine.sim.batch import Batch, BatchSim, Result, iso
from fairdistill.engine.sim.gemini import caller, from_gemini, generate_content, to_gemini
from fairdistill.engine.sim.keys import KeyState, org_of
from fairdistill.engine.sim.replies import gemini_error, json_reply
from fairdistill.engine.sim.strict import Refusal

MAX_BYTES = 2 * 1024**3
_TYPE = "type.googleapis.com/google.ai.generativelanguage.v1beta."
_STATE = {"": "SUCCEEDED", "expired": "EXPIRED", "canceled": "CANCELLED"}


def output_line(r: Result) -> bytes:
    """One output line: ``{"key", "response"}`` or ``{"key", "error": <google.rpc.Status>}``."""
    key, outcome, payload = r
    if outcome == "ok":
        return orjson.dumps({"key": key, "response": to_gemini(payload)}) + b"\n"
    if outcome == "5xx":
        error = {"code": 13, "message": "Internal error encountered."}
    else:  # a refused item: INVALID_ARGUMENT (NOT_FOUND for an unknown model)
        error = {"code": 5 if outcome == "404" else 3, "message": payload["error"]["message"]}
    return orjson.dumps({"key": key, "error": error}) + b"\n"


def _not_found() -> web.Response:
    return gemini_error(404, "Requested entity was not found.", "NOT_FOUND")


def _create_body(raw: bytes) -> tuple[Any, Any]:
    """(display name, input file name) of a create body (KeyError and co. when it has none)."""
    batch = orjson.loads(raw)["batch"]
    cfg = batch.get("input_config", batch.get("inputConfig"))
    return batch.get("display_name", batch.get("displayName")), cfg.get("file_name", cfg.get("fileName"))


class GeminiBatches:
    """The Gemini files and batch routes over a ``BatchSim`` (and the model route, whose
    ``generateContent`` verb is the online call)."""

    def __init__(self, sim: BatchSim):
        self.sim = sim
        self.uploads: dict[str, tuple[str, str | None]] = {}  # upload id -> (display name, organisation)
        self.meta: dict[str, dict] = {}  # File resources of the uploads, by name
        sim.wires["gemini"] = self

    def mount(self, app: web.Application) -> None:
        r = app.router
        r.add_post("/v1beta/models/{call}", self.model_call)
        r.add_post("/upload/v1beta/files", self.upload)
        r.add_get("/download/v1beta/files/{call}", self.download)
        r.add_get("/v1beta/files/{call}", self.download)
        r.add_get("/v1beta/batches", self.list_batches)
        r.add_get("/v1beta/batches/{bid}", self.get)
        r.add_post("/v1beta/batches/{bid}", self.cancel)

    def running(self, b: Batch) -> None:
        b.obj["metadata"].update(state="BATCH_STATE_RUNNING", updateTime=iso(time.time()))

    def ended(self, b: Batch, stop_as: str) -> None:
        """The Operation of an ended batch: its state, counts and ``responsesFile`` (the lines of
        the items processed, newest first: the order is not kept)."""
        lines = [output_line(r) for r in reversed(b.results) if r[1] not in ("expired", "canceled")]
        ok = sum(o == "ok" for _, o, _ in b.results)
        meta = b.obj["metadata"]
        meta.update(
            state=f"BATCH_STATE_{_STATE[stop_as]}",
            updateTime=iso(time.time()),
            endTime=iso(b.ended or time.time()),
            batchStats={
                "requestCount": str(len(b.items)),
                "successfulRequestCount": str(ok),
                "failedRequestCount": str(len(lines) - ok),
                "pendingRequestCount": "0",
            },
        )
        b.obj["done"] = True
        if lines:
            fid = self.sim.store_file(b"".join(lines), "files/batch-sim", b.org)
            meta["output"] = {"responsesFile": fid}
            b.obj["response"] = {"@type": _TYPE + "GenerateContentBatchOutput", "responsesFile": fid}

    def _key(self, request: web.Request) -> web.Response | KeyState | None:
        """The request's key (None: the simulator has no keys), or Google's refusal."""
        return caller(self.sim.core.keys, self.sim.core.profile.api_key, request)

    def _who(self, request: web.Request) -> web.Response | str | None:
        """The organisation of the request's key (None: no keys), or Google's refusal."""
        key = self._key(request)
        return key if isinstance(key, web.Response) else org_of(key)

    async def model_call(self, request: web.Request) -> web.Response:
        """``POST /v1beta/models/M:generateContent`` (online) or ``M:batchGenerateContent``."""
        if isinstance(key := self._key(request), web.Response):
            return key
        model, _, verb = request.match_info["call"].rpartition(":")
        if verb == "batchGenerateContent":
            return await self.create(request, model, org_of(key))
        if verb != "generateContent":
            return gemini_error(404, f"no method {verb!r}", "NOT_FOUND")
        return await generate_content(self.sim.core, request, model, key)

    async def upload(self, request: web.Request) -> web.Response:
        """``POST /upload/v1beta/files``, resumable: ``start`` answers ``X-Goog-Upload-URL``; a
        post there with ``upload, finalize`` (offset 0, the whole file) -> ``{"file": {...}}``,
        ``X-Goog-Upload-Status: final``. The upload URL is its own credential (google-genai posts
        there without the key), so only a post without one is asked for a key."""
        org: str | None = None
        if "upload_id" not in request.query:
            if isinstance(who := self._who(request), web.Response):
                return who
            org = who
        command = request.headers.get("X-Goog-Upload-Command", "").replace(" ", "")
        if command == "start" and request.headers.get("X-Goog-Upload-Protocol") == "resumable":
            return await self._upload_start(request, org)
        name, org = self.uploads.pop(request.query.get("upload_id", ""), (None, None))
        if name is None or command != "upload,finalize" or request.headers.get("X-Goog-Upload-Offset") != "0":
            return gemini_error(
                400, "start a resumable upload, then upload and finalize it", "INVALID_ARGUMENT"
            )
        data = await request.read()
        if len(data) > MAX_BYTES:
            return gemini_error(400, "file is larger than 2 GB", "INVALID_ARGUMENT")
        fid = self.sim.store_file(data, "files/sim", org)
        meta = {
            "name": fid,
            "displayName": name,
            "mimeType": "application/jsonl",
            "sizeBytes": str(len(data)),
        }
        self.meta[fid] = {**meta, "createTime": iso(time.time()), "state": "ACTIVE"}
        reply = json_reply({"file": self.meta[fid]})
        reply.headers["X-Goog-Upload-Status"] = "final"  # google-genai re-posts without it
        return reply

    async def _upload_start(self, request: web.Request, org: str | None) -> web.Response:
        try:
            name = orjson.loads(await request.read() or b"{}").get("file", {}).get("display_name", "")
        except (orjson.JSONDecodeError, AttributeError):
            return gemini_error(400, "Invalid JSON payload received.", "INVALID_ARGUMENT")
        uid = self.sim.next_id("up")
        self.uploads[uid] = (str(name), org)
        url = f"{self.sim.core.url}/upload/v1beta/files?upload_id={uid}&upload_protocol=resumable"
        return web.Response(body=b"", headers={"X-Goog-Upload-URL": url, "X-Goog-Upload-Status": "active"})

    async def download(self, request: web.Request) -> web.Response:
        """``GET /download/v1beta/files/F:download?alt=media`` and (as google-genai asks)
        ``GET /v1beta/files/F:download?alt=media``: the raw JSONL; ``GET /v1beta/files/F``: the
        File resource of an upload."""
        if isinstance(org := self._who(request), web.Response):
            return org
        call = request.match_info["call"]
        mine = self.sim.file(f"files/{call}", org) is not None
        if (
            ":" not in call
            and mine
            and f"files/{call}" in self.meta
            and not request.path.startswith("/download")
        ):
            return json_reply(self.meta[f"files/{call}"])
        name, _, verb = call.rpartition(":")
        data = self.sim.file(f"files/{name}", org)
        if verb != "download" or request.query.get("alt") != "media" or data is None:
            return _not_found()
        return web.Response(body=self.sim.cut(data), content_type="application/jsonl")

    def _items(self, data: bytes, model: str) -> tuple[list[tuple[str, dict]], dict | None]:
        """The items of an input file and the Operation error of its first bad line (if any)."""
        items: list[tuple[str, dict]] = []
        error: dict | None = None
        seen: set[str] = set()
        profile = self.sim.core.profile_for(model)
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
                items.append((key, from_gemini(req, model, profile)))
            except Refusal as exc:
                items.append((key, {"_sim_invalid": str(exc)}))
            except (ValueError, TypeError, KeyError, AttributeError) as exc:
                items.append((key, {"_sim_invalid": f"Invalid request: {exc}"}))
        return items, error

    async def create(self, request: web.Request, model: str, org: str | None) -> web.Response:
        """``{"batch": {"display_name", "input_config": {"file_name"}}}`` -> an Operation."""
        try:
            name, fid = _create_body(await request.read())
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
            message = "batch.display_name and batch.input_config.file_name are required"
            return gemini_error(400, message, "INVALID_ARGUMENT")
        if not isinstance(name, str) or not name:
            return gemini_error(400, "batch.display_name is required", "INVALID_ARGUMENT")
        data = self.sim.file(fid, org) if isinstance(fid, str) else None
        if data is None:
            return gemini_error(404, f"File {fid} was not found.", "NOT_FOUND")
        items, error = self._items(data, model)
        b = Batch("gemini", self.sim.next_id("gsim"), items, {"display_name": name}, org)
        b.obj = self._operation(b, model, fid)
        if error is not None:
            self.sim.failed(b)
            b.obj["metadata"].update(state="BATCH_STATE_FAILED", endTime=iso(b.ended or 0))
            b.obj.update(done=True, error=error)
        else:
            self.sim.start(b)
        if self.sim.lost():
            return gemini_error(500, "Internal error encountered.", "INTERNAL")
        return json_reply(b.obj)

    def _operation(self, b: Batch, model: str, fid: str) -> dict:
        """The Operation of a batch just created."""
        now, n = iso(b.created), str(len(b.items))
        return {
            "name": f"batches/{b.id}",
            "metadata": {
                "@type": _TYPE + "GenerateContentBatch",
                "model": f"models/{model}",
                "displayName": b.meta["display_name"],
                "inputConfig": {"fileName": fid},
                "createTime": now,
                "updateTime": now,
                "batchStats": {"requestCount": n, "pendingRequestCount": n},
                "state": "BATCH_STATE_PENDING",
                "name": f"batches/{b.id}",
            },
            "done": False,
        }

    def _named(self, request: web.Request) -> Batch | web.Response:
        if isinstance(org := self._who(request), web.Response):
            return org
        bid = request.match_info["bid"]
        b = self.sim.named(bid.rpartition(":")[0] or bid, "gemini", org)
        return b if b is not None else _not_found()

    async def get(self, request: web.Request) -> web.Response:
        if isinstance(b := self._named(request), web.Response):
            return b
        return json_reply(b.obj)

    async def cancel(self, request: web.Request) -> web.Response:
        """``POST /v1beta/batches/ID:cancel`` -> ``{}``."""
        if not request.match_info["bid"].endswith(":cancel"):
            return gemini_error(404, "no such method", "NOT_FOUND")
        if isinstance(b := self._named(request), web.Response):
            return b
        self.sim.cancel(b)
        return json_reply({})

    async def list_batches(self, request: web.Request) -> web.Response:
        """``GET /v1beta/batches?pageSize=&pageToken=`` -> ``{"operations", "nextPageToken"}``."""
        if isinstance(org := self._who(request), web.Response):
            return org
        query = {"limit": request.query.get("pageSize", "20"), "after": request.query.get("pageToken", "")}
        page = await self.sim.page("gemini", "after", lambda b: b.obj, {}, query, org)
        out: dict[str, Any] = {"operations": page["data"]}
        if page["has_more"]:
            out["nextPageToken"] = page["last_id"]
        return json_reply(out)
