"""What the batch executor needs of a provider's Batch API, and the HTTP helper both wires use.

A wire (``engine.batch.openai``, ``engine.batch.anthropic``) turns ``(custom_id, body)`` pairs
into a provider batch and its results back into ``Outcome`` tuples, through files on disk (a batch
of 50k requests never sits in memory whole)::

    wire.write_input(pairs, file)                 # the upload, in the provider's format
    remote = await wire.create(path, local)       # Lost: the reply is unknown (5xx, reset)
    remote = await wire.retrieve(remote.id)       # poll until remote.ended
    await wire.download(remote, file)             # the results, streamed to a file
    for cid, status, raw in wire.parse(file_lines(file), remote, ids): ...
    await wire.cancel(remote.id); await wire.list(limit)

Every reply is untrusted: bodies are decoded into small Structs; anything unusable is a
``Truncated`` (download again) or a ``ControlError`` (try the call again later). A 401/403 on any
control call is an ``AuthError``: the run aborts (exit 3).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, BinaryIO

import aiohttp
import msgspec

from engine.errors import AuthError, one_line
from engine.providers import error_message, redact

# Outcome of one item: status 200 (raw = the provider's online reply body), 4xx (raw = an error
# body; the record fails with the server's message) or 0 (transient: expired, canceled, 5xx,
# missing from the results; the item goes into a later batch).
Outcome = tuple[str, int, bytes]
TRANSIENT = 0


class Remote(msgspec.Struct, kw_only=True):
    """A provider batch as the executor sees it."""

    id: str
    status: str  # the provider's own word (in_progress, completed, ended, expired...)
    ended: bool
    created: float = 0.0  # unix seconds
    n: int = 0  # requests in it
    local: str = ""  # our local id, when the provider keeps metadata (OpenAI)
    output: str | None = None  # OpenAI output_file_id / Anthropic results_url
    errors_file: str | None = None  # OpenAI error_file_id
    line_errors: list[tuple[int, str]] = []  # OpenAI validation failure: (line, message)


class ControlError(Exception):
    """A control call failed in a way worth trying again (5xx, 429, reset, bad body)."""

    def __init__(self, message: str, status: int = 0):
        super().__init__(message)
        self.status = status


class Lost(ControlError):
    """A create whose reply never came: the batch may or may not exist."""


class Refused(Exception):
    """A create the provider refused for good (4xx): its items fail with this message."""

    def __init__(self, message: str, status: int, body: bytes):
        super().__init__(message)
        self.status, self.body = status, body


class Truncated(Exception):
    """A result download that cannot be read to its end."""


async def call(
    session: aiohttp.ClientSession, method: str, url: str, key: str | None, lane: str, **kw: Any
) -> tuple[int, bytes]:
    """One control call: (status, body) for a reply, ``ControlError`` for none, ``AuthError``
    for 401/403. Messages never carry the key."""
    try:
        async with session.request(method, url, **kw) as resp:
            status, raw = resp.status, await resp.read()
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise ControlError(redact(f"{method} {url}: {type(exc).__name__}: {exc}", key)) from None
    if status in (401, 403):
        raise AuthError(
            f"endpoint {lane!r} ({url}) refused the credentials (HTTP {status}: {error_message(raw, key)})"
        )
    return status, raw


async def fetch(
    session: aiohttp.ClientSession, url: str, key: str | None, lane: str, out: BinaryIO
) -> tuple[int, bytes]:
    """``GET url`` streamed into ``out`` (ended by a newline) when 2xx: ``(status, b"")``;
    otherwise ``(status, body)`` like ``call``."""
    try:
        async with session.get(url) as resp:
            status = resp.status
            if status >= 300:
                raw = await resp.read()
            else:
                raw, last = b"", b"\n"
                async for chunk in resp.content.iter_chunked(1 << 16):
                    out.write(chunk)
                    last = chunk[-1:] or last
                if last != b"\n":
                    out.write(b"\n")  # a cut last line then fails to parse (Truncated)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise ControlError(redact(f"GET {url}: {type(exc).__name__}: {exc}", key)) from None
    if status in (401, 403):
        raise AuthError(
            f"endpoint {lane!r} ({url}) refused the credentials (HTTP {status}: {error_message(raw, key)})"
        )
    return status, raw


def file_lines(f: BinaryIO) -> Iterator[bytes]:
    """The non-blank lines of a results file, read from its start, one at a time."""
    f.seek(0)
    for line in f:
        if len(line) > 8 or line.strip():  # a JSON line is never under 8 bytes
            yield line


def failed(method: str, url: str, status: int, raw: bytes, key: str | None) -> ControlError:
    return ControlError(one_line(f"{method} {url}: HTTP {status}: {error_message(raw, key)}"), status)


def lines(data: bytes):
    """The non-blank lines of ``data`` as zero-copy memoryviews (a results file can be 100s of MB)."""
    view, start = memoryview(data), 0
    while start < len(data):
        end = data.find(b"\n", start)
        end = len(data) if end < 0 else end
        if end - start > 8 or data[start:end].strip():  # a JSON line is never under 8 bytes
            yield view[start:end]
        start = end + 1


def decode(decoder: msgspec.json.Decoder, raw: bytes, what: str) -> Any:
    try:
        return decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
        raise ControlError(f"unusable {what}: {one_line(str(exc), 200)}") from None
