"""OpenAI Batch API: upload a JSONL file (``POST /files``, ``purpose=batch``), create the batch
(``POST /batches`` {input_file_id, endpoint, completion_window: "24h", metadata}), poll
``GET /batches/{id}`` until ``completed | expired | cancelled | failed``, then read
``GET /files/{output_file_id}/content`` and ``/files/{error_file_id}/content``.

Input lines: ``{"custom_id", "method": "POST", "url": "/v1/chat/completions", "body": <chat body>}``;
output lines: ``{"id", "custom_id", "response": {"status_code", "body"} | null, "error": {"code",
"message"} | null}``. ``metadata.fair_batch`` holds our local id, so a create whose reply was lost
is found again by listing batches. https://platform.openai.com/docs/api-reference/batch
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import aiohttp
import msgspec

from fairdistill.engine.request.batch.wire import (
    TRANSIENT,
    BatchWire,
    Outcome,
    Refused,
    Remote,
    call,
    decode,
    failed,
    results,
)
from fairdistill.engine.request.providers import error_message
from fairdistill.engine.request.providers.status import again_later

MAX_ITEMS = 50_000
MAX_BYTES = 200 * 1024**2
ENDED = frozenset({"completed", "expired", "cancelled", "failed"})


class _Counts(msgspec.Struct):
    total: int = 0


class _LineError(msgspec.Struct):
    message: str | None = ""
    line: int | None = None


class _Errors(msgspec.Struct):
    data: list[_LineError] = []


class _Batch(msgspec.Struct):
    id: str
    status: str
    created_at: float = 0.0
    output_file_id: str | None = None
    error_file_id: str | None = None
    request_counts: _Counts | None = None
    metadata: dict[str, str] | None = None
    errors: _Errors | None = None


class _File(msgspec.Struct):
    id: str


class _Response(msgspec.Struct):
    status_code: int
    body: msgspec.Raw = msgspec.Raw(b"{}")


class _Line(msgspec.Struct):
    custom_id: str
    response: _Response | None = None
    error: dict | None = None


_file = msgspec.json.Decoder(_File)
_line = msgspec.json.Decoder(_Line)
_enc = msgspec.json.Encoder()


def _remote(b: _Batch) -> Remote:
    errors = [(e.line or 0, e.message or "invalid request") for e in (b.errors.data if b.errors else [])]
    return Remote(
        id=b.id,
        status=b.status,
        ended=b.status in ENDED,
        created=b.created_at,
        n=b.request_counts.total if b.request_counts else 0,
        local=(b.metadata or {}).get("fair_batch", ""),
        output=b.output_file_id,
        errors_file=b.error_file_id,
        line_errors=errors,
    )


class OpenAIBatchWire(BatchWire, batch=_Batch):
    max_items, max_bytes = MAX_ITEMS, MAX_BYTES
    batches, after, noun = "/batches", "after", "batch object"
    remote = staticmethod(_remote)

    @staticmethod
    def line(custom_id: str, body: bytes) -> bytes:
        return b'{"custom_id":"%s","method":"POST","url":"/v1/chat/completions","body":%s}\n' % (
            custom_id.encode(),
            body,
        )

    def write_input(self, items: Iterable[tuple[str, bytes]], out: BinaryIO) -> None:
        for cid, body in items:
            out.write(self.line(cid, body))

    async def create(self, path: Path, local: str) -> Remote:
        """Upload the input file ``path`` (streamed from disk), then create the batch."""
        with open(path, "rb") as data:
            form = aiohttp.FormData()
            form.add_field("purpose", "batch")
            form.add_field("file", data, filename=f"{local}.jsonl", content_type="application/jsonl")
            status, raw = await call(
                self.session, "POST", self.base + "/files", self.key, self.lane, data=form
            )
        if status >= 300:
            raise self._refusal("POST", "/files", status, raw)
        fid = decode(_file, raw, "file object").id
        body = {
            "input_file_id": fid,
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
            "metadata": {"fair_batch": local},
        }
        return await self._create(data=_enc.encode(body), headers={"Content-Type": "application/json"})

    def _refusal(self, method: str, path: str, status: int, raw: bytes) -> Exception:
        if again_later(status):
            return failed(method, self.base + path, status, raw, self.key)
        return Refused(f"{method} {path}: HTTP {status}: {error_message(raw, self.key)}", status, raw)

    async def find(self, local: str, t_create: float, n: int) -> list[Remote]:
        """Batches carrying our local id in their metadata (newest 100 looked at)."""
        return [r for r in await self.list(100) if r.local == local]

    async def download(self, remote: Remote, out: BinaryIO) -> None:
        """The output file, then the error file, streamed into ``out``."""
        for fid in (remote.output, remote.errors_file):
            if fid:
                await self._fetch(f"{self.base}/files/{fid}/content", out)

    def parse(
        self, lines: Iterable[bytes], remote: Remote, ids: list[str], bad: list[int] | None = None
    ) -> Iterator[Outcome]:
        """Outcomes of the items ``ids`` (in upload order), one by one; raises ``Truncated`` on a
        bad line or, at the end, when lines are missing (``bad``: see ``wire.results``)."""
        if remote.status == "failed":  # validation failed: map each error line to its item
            invalid = {line: msg for line, msg in remote.line_errors}
            for i, cid in enumerate(ids, 1):
                if i in invalid:
                    yield cid, 400, _enc.encode({"error": {"message": f"batch validation: {invalid[i]}"}})
                else:
                    yield cid, TRANSIENT, b""
            return
        for line in results(_line, lines, min(remote.n, len(ids)), "output", bad):
            r = line.response
            if r is None or again_later(r.status_code):
                yield line.custom_id, TRANSIENT, b""
            else:
                yield line.custom_id, r.status_code, bytes(r.body)
