"""Gemini Batch API (batch mode), with a file for input and output, so a 100k-request job is never
one JSON body:

1. upload the JSONL through the Files API, resumable protocol: ``POST {root}/upload/v1beta/files``
   (``X-Goog-Upload-Protocol: resumable``, ``X-Goog-Upload-Command: start``, body ``{"file":
   {"display_name"}}``) answers an ``X-Goog-Upload-URL`` header; ``POST`` the bytes there
   (``X-Goog-Upload-Command: upload, finalize``, offset 0) -> ``{"file": {"name": "files/..."}}``.
   Input lines: ``{"key": custom_id, "request": <the online generateContent body>}``.
2. ``POST {base}/models/{model}:batchGenerateContent`` ``{"batch": {"display_name": local,
   "input_config": {"file_name": "files/..."}}}`` -> an Operation ``{"name": "batches/ID",
   "metadata": <GenerateContentBatch>}``; ``display_name`` is our local id, so a create whose reply
   was lost is found again by listing batches (like OpenAI's metadata).
3. ``GET {base}/batches/ID`` (the same Operation; ``metadata.state`` is ``BATCH_STATE_`` or
   ``JOB_STATE_`` + PENDING | RUNNING | SUCCEEDED | FAILED | CANCELLED | EXPIRED; ``done``;
   ``response.responsesFile`` or ``metadata.output.responsesFile``; ``metadata.batchStats`` with
   int64 counts as strings), ``GET {base}/batches?pageSize=&pageToken=`` -> ``{"operations",
   "nextPageToken"}``, ``POST {base}/batches/ID:cancel`` -> ``{}``.
4. ``GET {root}/download/v1beta/files/...:download?alt=media``: JSONL of ``{"key", "response":
   <GenerateContentResponse>}`` or ``{"key", "error": <google.rpc.Status>}``, in any order.

The key travels in the ``x-goog-api-key`` header only (the session's), never in a URL; the upload
URL the server names is used only on the base URL's own host. Server-given names are checked
before they go into a path. https://ai.google.dev/gemini-api/docs/batch-mode,
https://ai.google.dev/api/batch-mode, https://ai.google.dev/api/files
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote, urlsplit

import aiohttp
import msgspec

from fairdistill.engine.request.batch.wire import (
    TRANSIENT,
    BatchWire,
    ControlError,
    Outcome,
    Refused,
    Remote,
    checked,
    control_reply,
    decode,
    failed,
    no_reply,
    results,
    usable,
)
from fairdistill.engine.request.providers import error_message
from fairdistill.engine.request.providers.status import again_later

MAX_ITEMS = 1_000_000  # no documented request cap; the config's own ceiling
MAX_BYTES = 2 * 1024**3  # the Files API's 2 GB per file
ENDED = frozenset({"succeeded", "failed", "cancelled", "expired"})
# google.rpc.Code of an item error -> the status the record fails with; other codes go again
_INVALID = {3: 400, 5: 404, 9: 400, 11: 400}  # INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION, OUT_OF_RANGE
_LINE = re.compile(r"\bline (\d+)")
Int64 = int | str  # proto int64 travels as a JSON string


class GeminiRemote(Remote, kw_only=True):
    """A Gemini batch: ``lines`` is how many result lines its file must hold."""

    lines: int = 0
    error: tuple[int, str] | None = None  # the Operation's error (code, message), for a failed batch


class _Stats(msgspec.Struct, rename="camel"):
    request_count: Int64 = 0
    successful_request_count: Int64 = 0
    failed_request_count: Int64 = 0
    pending_request_count: Int64 = 0


class _Output(msgspec.Struct, rename="camel"):
    responses_file: str | None = None


class _Meta(msgspec.Struct, rename="camel"):
    state: str = ""
    display_name: str = ""
    create_time: str | None = None
    batch_stats: _Stats | None = None
    output: _Output | None = None


class _Status(msgspec.Struct):
    code: int = 0
    message: str | None = ""


class _Operation(msgspec.Struct):
    name: str
    metadata: _Meta | None = None
    done: bool = False
    response: _Output | None = None
    error: _Status | None = None


class _List(msgspec.Struct, rename="camel"):
    operations: list[_Operation] = []
    next_page_token: str | None = None


class _FileObj(msgspec.Struct):
    name: str


class _Uploaded(msgspec.Struct):
    file: _FileObj


class _Line(msgspec.Struct):
    key: str
    response: msgspec.Raw = msgspec.Raw(b"null")  # Raw cannot sit in a union
    error: _Status | None = None


_list = msgspec.json.Decoder(_List)
_uploaded = msgspec.json.Decoder(_Uploaded)
_line = msgspec.json.Decoder(_Line)
_enc = msgspec.json.Encoder()


def _int(v: Int64) -> int:
    try:
        return max(0, int(v))
    except ValueError:
        return 0


def _ts(stamp: str | None) -> float:
    """RFC 3339 with up to 9 fractional digits -> unix seconds (0 when unreadable)."""
    if not stamp:
        return 0.0
    stamp = re.sub(r"(\.\d{6})\d+", r"\1", stamp)
    try:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except (ValueError, OverflowError):
        return 0.0


def _state(word: str) -> str:
    """``BATCH_STATE_SUCCEEDED`` / ``JOB_STATE_SUCCEEDED`` -> ``succeeded``."""
    return word.removeprefix("BATCH_STATE_").removeprefix("JOB_STATE_").lower() or "unknown"


def _remote(op: _Operation) -> GeminiRemote:
    m = op.metadata or _Meta()
    s = m.batch_stats or _Stats()
    status = _state(m.state)
    ended = status in ENDED
    n, ok, bad = _int(s.request_count), _int(s.successful_request_count), _int(s.failed_request_count)
    out = (op.response.responses_file if op.response else None) or (
        m.output.responses_file if m.output else None
    )
    return GeminiRemote(
        id=checked(op.name, "batches/", "batch").removeprefix("batches/"),
        status=status,
        ended=ended,
        created=_ts(m.create_time),
        n=n,
        local=m.display_name,
        output=checked(out, "files/", "responses file") if out else None,
        lines=n if status == "succeeded" else ok + bad,
        error=(op.error.code, op.error.message or "batch failed") if op.error else None,
    )


class GeminiBatchWire(BatchWire, batch=_Operation):
    max_items, max_bytes = MAX_ITEMS, MAX_BYTES
    batches, after, noun = "/batches", "pageToken", "batch operation"
    remote = staticmethod(_remote)

    def __init__(
        self, session: aiohttp.ClientSession, base_url: str, key: str | None, lane: str, model: str = ""
    ):
        super().__init__(session, base_url, key, lane, model)
        parts = urlsplit(self.base)
        self.root, self.version = f"{parts.scheme}://{parts.netloc}", parts.path  # ".../v1beta"

    @staticmethod
    def line(custom_id: str, body: bytes) -> bytes:
        return b'{"key":"%s","request":%s}\n' % (custom_id.encode(), body)

    def write_input(self, items: Iterable[tuple[str, bytes]], out: BinaryIO) -> None:
        for cid, body in items:
            out.write(self.line(cid, body))

    async def create(self, path: Path, local: str) -> Remote:
        """Upload ``path`` (streamed from disk), then create the batch named ``local``."""
        fname = await self._upload(path, local)
        body = {"batch": {"display_name": local, "input_config": {"file_name": fname}}}
        model = quote(self.model.removeprefix("models/"), safe="")
        return await self._create(
            f"/models/{model}:batchGenerateContent",
            data=_enc.encode(body),
            headers={"Content-Type": "application/json"},
        )

    async def _upload(self, path: Path, local: str) -> str:
        """The Files API's resumable upload, in one chunk: the file's ``files/...`` name."""
        size = os.path.getsize(path)
        url = f"{self.root}/upload{self.version}/files"
        start = {
            "X-Goog-Upload-Protocol": "resumable",
            "X-Goog-Upload-Command": "start",
            "X-Goog-Upload-Header-Content-Length": str(size),
            "X-Goog-Upload-Header-Content-Type": "application/jsonl",
            "Content-Type": "application/json",
        }
        meta = _enc.encode({"file": {"display_name": local}})
        status, raw, where = await self._send("POST", url, data=meta, headers=start)
        if status >= 300:
            raise self._refusal("POST", url, status, raw)
        if not where or urlsplit(where)._replace(path="", query="", fragment="").geturl() != self.root:
            raise ControlError(f"POST {url}: no usable X-Goog-Upload-URL on {self.root} in the reply")
        with open(path, "rb") as data:
            headers = {"X-Goog-Upload-Command": "upload, finalize", "X-Goog-Upload-Offset": "0"}
            status, raw, _ = await self._send("POST", where, data=data, headers=headers)
        if status >= 300:
            raise self._refusal("POST", url, status, raw)
        return checked(decode(_uploaded, raw, "file object").file.name, "files/", "file")

    async def _send(self, method: str, url: str, **kw: Any) -> tuple[int, bytes, str | None]:
        """Like ``wire.call``, with the ``X-Goog-Upload-URL`` reply header."""
        try:
            async with self.session.request(method, url, **kw) as resp:
                status, raw, where = resp.status, await resp.read(), resp.headers.get("X-Goog-Upload-URL")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise no_reply(method, url.split("?")[0], exc, self.key) from None
        return (*control_reply(status, raw, url.split("?")[0], self.key, self.lane), where)

    def _refusal(self, method: str, url: str, status: int, raw: bytes) -> Exception:
        if again_later(status):
            return failed(method, url, status, raw, self.key)
        return Refused(f"{method} {url}: HTTP {status}: {error_message(raw, self.key)}", status, raw)

    async def retrieve(self, bid: str) -> Remote:
        return await self._on_batch("GET", f"/batches/{checked(bid, '', 'batch')}")

    async def cancel(self, bid: str) -> Remote:
        """``POST batches/ID:cancel`` (it answers ``{}``), then the batch as it is now."""
        path = f"/batches/{checked(bid, '', 'batch')}:cancel"
        status, raw = await self._json("POST", path)
        if status >= 300:
            raise failed("POST", self.base + path, status, raw, self.key)
        return await self.retrieve(bid)

    async def find(self, local: str, t_create: float, n: int) -> list[Remote]:
        """Batches whose display name is our local id (newest 100 looked at)."""
        return [r for r in await self.list(100) if r.local == local]

    async def download(self, remote: Remote, out: BinaryIO) -> None:
        """The responses file, streamed into ``out`` (none when no item was answered)."""
        if remote.output:
            await self._fetch(f"{self.root}/download{self.version}/{remote.output}:download?alt=media", out)

    def parse(
        self, lines: Iterable[bytes], remote: Remote, ids: list[str], bad: list[int] | None = None
    ) -> Iterator[Outcome]:
        """Outcomes, one by one (any order); ``Truncated`` on a bad line or missing lines. A batch
        that failed as a whole: the item its error names by line fails, the rest go again (all
        fail when the error is a refusal naming no line). ``bad``: see ``wire.results``."""
        expect = remote.lines if isinstance(remote, GeminiRemote) else remote.n
        err = remote.error if isinstance(remote, GeminiRemote) else None
        if remote.status == "failed" and not remote.output:
            code, msg = err or (13, "batch failed")
            named = {int(m) for m in _LINE.findall(msg)}
            for i, cid in enumerate(ids, 1):
                if code in _INVALID and (i in named or not named):
                    yield cid, _INVALID[code], _error(f"batch validation: {msg}")
                else:
                    yield cid, TRANSIENT, b""
            return
        for line in results(_line, lines, min(expect, len(ids)), "output", bad):
            if bytes(line.response) != b"null":
                yield line.key, 200, bytes(line.response)
            elif line.error is not None and line.error.code in _INVALID:
                yield line.key, _INVALID[line.error.code], _error(line.error.message or "invalid request")
            else:  # INTERNAL, UNAVAILABLE, RESOURCE_EXHAUSTED, CANCELLED...: a later batch
                yield line.key, TRANSIENT, b""

    # last in the class: below it, `list` in an annotation would name this method, not the builtin
    async def list(self, limit: int = 100) -> list[Remote]:
        """The newest batches, ``limit`` at most (pages of 100 followed)."""
        out: list[Remote] = []
        token = ""
        while len(out) < limit:
            q = f"/batches?pageSize={min(100, limit - len(out))}" + (
                f"&pageToken={quote(token, safe='')}" if token else ""
            )
            status, raw = await self._json("GET", q)
            if status >= 300:
                raise failed("GET", self.base + "/batches", status, raw, self.key)
            page = decode(_list, raw, "batch list")
            out += usable(self.remote, page.operations)
            if not page.next_page_token or not page.operations:
                break
            token = page.next_page_token
        return out


def _error(message: str) -> bytes:
    return _enc.encode({"error": {"message": message}})
