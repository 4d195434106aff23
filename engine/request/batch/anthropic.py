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

import msgspec

from fairdistill.engine.request.batch.wire import TRANSIENT, BatchWire, Outcome, Remote, results

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


class AnthropicBatchWire(BatchWire, batch=_Batch):
    max_items, max_bytes = MAX_ITEMS, MAX_BYTES
    batches, after, noun = "/messages/batches", "after_id", "message batch"
    remote = staticmethod(_remote)

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
        with open(path, "rb") as data:
            return await self._create(data=data, headers={"Content-Type": "application/json"})

    async def find(self, local: str, t_create: float, n: int) -> list[Remote]:
        """Batches of ``n`` requests created since our ``creating`` event (less the clock skew)."""
        return [r for r in await self.list(100) if r.n == n and r.created >= t_create - CLOCK_SKEW_S]

    async def download(self, remote: Remote, out: BinaryIO) -> None:
        """The results (JSONL), streamed into ``out``."""
        url = f"{self.base}/messages/batches/{remote.id}/results"
        if remote.output and remote.output.split("/")[:3] == self.base.split("/")[:3]:
            url = remote.output  # results_url, only on our own host: the key goes with it
        await self._fetch(url, out)

    def parse(
        self, lines: Iterable[bytes], remote: Remote, ids: list[str], bad: list[int] | None = None
    ) -> Iterator[Outcome]:
        """Outcomes, one by one (any order); ``Truncated`` on a bad line or missing lines
        (``bad``: see ``wire.results``)."""
        for line in results(_line, lines, min(remote.n, len(ids)), "results", bad):
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
