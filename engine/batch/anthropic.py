"""Anthropic Message Batches: ``POST /messages/batches`` {requests: [{custom_id, params}]}, poll
``GET /messages/batches/{id}`` until ``processing_status == "ended"``, then read ``results_url``
(JSONL of ``{custom_id, result: {type: succeeded | errored | canceled | expired, message | error}}``,
in no particular order). ``custom_id`` must match ``^[a-zA-Z0-9_-]{1,64}$``.

Anthropic keeps no metadata on a batch, so a create whose reply was lost is found again by its
creation time (not before our ``creating`` event, less a minute of clock skew) and its size.
https://docs.anthropic.com/en/api/creating-message-batches
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import BinaryIO

import aiohttp
import msgspec

from engine.batch.wire import (
    TRANSIENT,
    ControlError,
    Lost,
    Outcome,
    Refused,
    Remote,
    Truncated,
    call,
    decode,
    failed,
    fetch,
)
from engine.providers import error_message

MAX_ITEMS = 100_000
MAX_BYTES = 256 * 1024**2
CLOCK_SKEW_S = 60.0


class _Counts(msgspec.Struct):
    processing: int = 0
    succeeded: int = 0
    errored: int = 0
    canceled: int = 0
    expired: int = 0


class _Batch(msgspec.Struct):
    id: str
    processing_status: str
    created_at: str | None = None
    request_counts: _Counts | None = None
    results_url: str | None = None


class _List(msgspec.Struct):
    data: list[_Batch]
    has_more: bool = False
    last_id: str | None = None


class _ErrInner(msgspec.Struct):
    type: str = "api_error"
    message: str | None = None


class _Err(msgspec.Struct):
    error: _ErrInner | None = None


class _Result(msgspec.Struct):
    type: str
    message: msgspec.Raw = msgspec.Raw(b"null")  # Raw cannot sit in a union
    error: _Err | None = None


class _Line(msgspec.Struct):
    custom_id: str
    result: _Result


_batch = msgspec.json.Decoder(_Batch)
_list = msgspec.json.Decoder(_List)
_line = msgspec.json.Decoder(_Line)
_enc = msgspec.json.Encoder()


def _ts(stamp: str | None) -> float:
    try:
        return datetime.fromisoformat(stamp).timestamp() if stamp else 0.0
    except (ValueError, OverflowError):
        return 0.0


def _remote(b: _Batch) -> Remote:
    c = b.request_counts or _Counts()
    return Remote(
        id=b.id,
        status=b.processing_status,
        ended=b.processing_status == "ended",
        created=_ts(b.created_at),
        n=c.processing + c.succeeded + c.errored + c.canceled + c.expired,
        output=b.results_url,
    )


class AnthropicBatchWire:
    max_items, max_bytes = MAX_ITEMS, MAX_BYTES

    def __init__(self, session: aiohttp.ClientSession, base_url: str, key: str | None, lane: str):
        self.session, self.base, self.key, self.lane = session, base_url.rstrip("/"), key, lane

    async def _json(self, method: str, path: str, data: bytes | None = None) -> tuple[int, bytes]:
        kw = {"data": data, "headers": {"Content-Type": "application/json"}} if data is not None else {}
        return await call(self.session, method, self.base + path, self.key, self.lane, **kw)

    @staticmethod
    def line(custom_id: str, body: bytes) -> bytes:
        return b'{"custom_id":"%s","params":%s}' % (custom_id.encode(), body)

    def write_input(self, items: Iterable[tuple[str, bytes]], out: BinaryIO) -> None:
        out.write(b'{"requests":[')
        for i, (cid, body) in enumerate(items):
            out.write(b"," + self.line(cid, body) if i else self.line(cid, body))
        out.write(b"]}")

    async def create(self, path: Path, local: str) -> Remote:
        """Post the request file ``path`` (streamed from disk)."""
        try:
            with open(path, "rb") as data:
                headers = {"Content-Type": "application/json"}
                url = self.base + "/messages/batches"
                status, raw = await call(
                    self.session, "POST", url, self.key, self.lane, data=data, headers=headers
                )
        except ControlError as exc:  # no reply: the batch may exist
            raise Lost(str(exc)) from None
        if status >= 500 or status == 429:
            raise Lost(f"POST /messages/batches: HTTP {status}: {error_message(raw, self.key)}", status)
        if status >= 300:
            msg = f"POST /messages/batches: HTTP {status}: {error_message(raw, self.key)}"
            raise Refused(msg, status, raw)
        return _remote(decode(_batch, raw, "message batch"))

    async def retrieve(self, bid: str) -> Remote:
        status, raw = await self._json("GET", f"/messages/batches/{bid}")
        if status >= 300:
            raise failed("GET", f"{self.base}/messages/batches/{bid}", status, raw, self.key)
        return _remote(decode(_batch, raw, "message batch"))

    async def cancel(self, bid: str) -> Remote:
        status, raw = await self._json("POST", f"/messages/batches/{bid}/cancel")
        if status >= 300:
            raise failed("POST", f"{self.base}/messages/batches/{bid}/cancel", status, raw, self.key)
        return _remote(decode(_batch, raw, "message batch"))

    async def list(self, limit: int = 100) -> list[Remote]:
        out: list[Remote] = []
        after = ""
        while len(out) < limit:
            q = f"/messages/batches?limit={min(100, limit - len(out))}" + (
                f"&after_id={after}" if after else ""
            )
            status, raw = await self._json("GET", q)
            if status >= 300:
                raise failed("GET", self.base + "/messages/batches", status, raw, self.key)
            page = decode(_list, raw, "batch list")
            out += [_remote(b) for b in page.data]
            if not page.has_more or not page.data:
                break
            after = page.data[-1].id
        return out

    async def find(self, local: str, t_create: float, n: int) -> list[Remote]:
        """Batches of ``n`` requests created since our ``creating`` event (less the clock skew)."""
        return [r for r in await self.list(100) if r.n == n and r.created >= t_create - CLOCK_SKEW_S]

    async def download(self, remote: Remote, out: BinaryIO) -> None:
        """The results (JSONL), streamed into ``out``."""
        url = f"{self.base}/messages/batches/{remote.id}/results"
        if remote.output and remote.output.split("/")[:3] == self.base.split("/")[:3]:
            url = remote.output  # results_url, only on our own host: the key goes with it
        status, raw = await fetch(self.session, url, self.key, self.lane, out)
        if status >= 300:
            raise failed("GET", url, status, raw, self.key)

    def parse(self, lines: Iterable[bytes], remote: Remote, ids: list[str]) -> Iterator[Outcome]:
        """Outcomes, one by one (any order); ``Truncated`` on a bad line or missing lines."""
        n = 0
        for raw in lines:
            try:
                line = _line.decode(raw)
            except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
                raise Truncated("unreadable line in the batch results") from None
            n += 1
            r = line.result
            if r.type == "succeeded" and bytes(r.message) != b"null":
                yield line.custom_id, 200, bytes(r.message)
            elif (
                r.type == "errored"
                and r.error
                and r.error.error
                and r.error.error.type == "invalid_request_error"
            ):
                err = _enc.encode(
                    {
                        "type": "error",
                        "error": {"type": "invalid_request_error", "message": r.error.error.message or ""},
                    }
                )
                yield line.custom_id, 400, err
            else:  # canceled, expired, api/overloaded errors: a later batch
                yield line.custom_id, TRANSIENT, b""
        if n < remote.n:
            raise Truncated(f"batch results have {n} of {remote.n} lines")
