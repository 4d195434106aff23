"""What the batch executor needs of a provider's Batch API, and what both wires share: the HTTP
helpers and ``BatchWire``, their base (the calls that are alike on both providers).

A wire (``engine.request.batch.openai``, ``engine.request.batch.anthropic``) turns ``(custom_id, body)`` pairs
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

import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any, BinaryIO, Generic, TypeVar, cast

import aiohttp
import msgspec

from fairdistill.engine.errors import AuthError, one_line
from fairdistill.engine.request.providers import error_message, redact
from fairdistill.engine.request.providers.status import again_later, refused_credentials

# Outcome of one item: status 200 (raw = the provider's online reply body), 4xx (raw = an error
# body; the record fails with the server's message) or 0 (transient: expired, canceled, 5xx,
# missing from the results; the item goes into a later batch).
Outcome = tuple[str, int, bytes]
TRANSIENT = 0
B = TypeVar("B")  # a provider's batch object
_enc = msgspec.json.Encoder()
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")  # an id from the server, before it goes into a URL


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


class Page(msgspec.Struct, Generic[B]):
    """One page of a provider's batch list (both keep this shape)."""

    data: list[B]
    has_more: bool = False
    last_id: str | None = None


class ControlError(Exception):
    """A control call failed in a way worth trying again (5xx, 429, reset, bad body)."""

    def __init__(self, message: str, status: int = 0):
        super().__init__(message)
        self.status = status


class Lost(ControlError):
    """A create whose reply never came or could not be read: the batch may exist. ``status``
    200 (any 2xx): the provider answered that it made one, in a body we cannot use."""


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
        raise no_reply(method, url, exc, key) from None
    return control_reply(status, raw, url, key, lane)


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
        raise no_reply("GET", url, exc, key) from None
    return control_reply(status, raw, url, key, lane)


def no_reply(method: str, url: str, exc: BaseException, key: str | None) -> ControlError:
    """A control call that got no reply (reset, timeout), as one line with the key redacted."""
    return ControlError(redact(f"{method} {url}: {type(exc).__name__}: {exc}", key))


def control_reply(status: int, raw: bytes, url: str, key: str | None, lane: str) -> tuple[int, bytes]:
    """``(status, raw)``, or ``AuthError`` for 401/403 (and Gemini's 400 ``API_KEY_INVALID``)."""
    if refused_credentials(status, raw):
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


def checked(name: str, prefix: str, what: str) -> str:
    """``prefix`` + an id the server gave, or ``ControlError`` when the id is not plain (it goes
    into a URL path and a terminal: no ``/``, ``..`` or control bytes)."""
    bare = name.removeprefix(prefix)
    if not _NAME.fullmatch(bare):
        raise ControlError(f"unusable {what} name from the server: {one_line(repr(name[:80]))}")
    return prefix + bare


def decode(decoder: msgspec.json.Decoder, raw: bytes, what: str) -> Any:
    try:
        return decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
        raise ControlError(f"unusable {what}: {one_line(str(exc), 200)}") from None


def results(
    decoder: msgspec.json.Decoder,
    lines: Iterable[bytes],
    expect: int,
    what: str,
    bad: list[int] | None = None,
) -> Iterator[Any]:
    """The decoded lines of a results file; ``Truncated`` on an unreadable line or, at the end, when
    fewer than ``expect`` came (a download cut at a line boundary). ``what``: "results", "output".
    With a ``bad`` list (the last download try), unreadable lines are skipped and their numbers
    appended to it, and a short file is accepted: every readable result is used."""
    n = 0
    for lineno, raw in enumerate(lines, 1):
        try:
            line = decoder.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
            if bad is None:
                raise Truncated(f"unreadable line {lineno} in the batch {what}") from None
            bad.append(lineno)
            continue
        n += 1
        yield line
    if n < expect and bad is None:
        verb = "have" if what.endswith("s") else "has"
        raise Truncated(f"batch {what} {verb} {n} of {expect} lines")


def usable(convert: Callable[[Any], Remote], objects: Iterable[Any]) -> list[Remote]:
    """The listed batch objects that convert to a ``Remote`` with a plain id; the others (a
    hostile or broken entry) cannot be ours to poll and are left out."""
    out = []
    for obj in objects:
        try:
            remote = convert(obj)
            checked(remote.id, "", "batch")
        except ControlError:
            continue
        out.append(remote)
    return out


class BatchWire:
    """The calls both providers make alike on their batches collection (``{base}{batches}``):
    create's reply, retrieve, cancel, the paged list, result downloads. A provider's wire sets
    the class attributes and writes what differs: its input and result shapes, ``create``,
    ``find``, ``download``, ``parse``."""

    max_items: int
    max_bytes: int
    batches: str  # the collection's path: "/batches", "/messages/batches"
    after: str  # the list's paging parameter
    noun: str  # the batch object, as unusable-reply messages name it
    batch_decoder: msgspec.json.Decoder  # of the provider's batch object (from ``batch=``)
    list_decoder: msgspec.json.Decoder  # of a ``Page`` of them
    remote: Callable[[Any], Remote]  # provider batch object -> Remote

    def __init_subclass__(cls, batch: type, **kw: Any) -> None:
        """``class XBatchWire(BatchWire, batch=XBatch)``: decoders of that batch object and its list."""
        super().__init_subclass__(**kw)
        cls.batch_decoder = msgspec.json.Decoder(batch)
        cls.list_decoder = msgspec.json.Decoder(cast(Any, Page)[batch])  # a type made at run time

    def __init__(
        self, session: aiohttp.ClientSession, base_url: str, key: str | None, lane: str, model: str = ""
    ):
        self.session, self.base, self.key, self.lane = session, base_url.rstrip("/"), key, lane
        self.model = model  # the endpoint's model (Gemini names it in the create URL)

    async def _json(self, method: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
        kw = {"data": _enc.encode(body), "headers": {"Content-Type": "application/json"}} if body else {}
        return await call(self.session, method, self.base + path, self.key, self.lane, **kw)

    def _decoded(self, raw: bytes) -> Remote:
        """The batch object in ``raw``; ``ControlError`` when it is unusable (its id included)."""
        remote = self.remote(decode(self.batch_decoder, raw, self.noun))
        checked(remote.id, "", self.noun)
        return remote

    async def _create(self, path: str = "", **kw: Any) -> Remote:
        """``POST {batches}`` (or ``path``) with ``kw`` (the request body): the new batch. ``Lost``
        when no reply came or a 5xx/429 did (the batch may exist); ``Refused`` for another 4xx."""
        path = path or self.batches
        try:
            url = self.base + path
            status, raw = await call(self.session, "POST", url, self.key, self.lane, **kw)
        except ControlError as exc:  # no reply: the batch may exist
            raise Lost(str(exc)) from None
        if status >= 300:
            msg = f"POST {path}: HTTP {status}: {error_message(raw, self.key)}"
            if again_later(status):
                raise Lost(msg, status)
            raise Refused(msg, status, raw)
        try:
            return self._decoded(raw)
        except ControlError as exc:  # answered, unreadable: the batch exists, its id is unknown
            raise Lost(f"POST {path}: HTTP {status}: {exc}", status) from None

    async def _on_batch(self, method: str, path: str) -> Remote:
        """A control call on one batch: the batch as it is now."""
        status, raw = await self._json(method, path)
        if status >= 300:
            raise failed(method, self.base + path, status, raw, self.key)
        return self._decoded(raw)

    async def retrieve(self, bid: str) -> Remote:
        return await self._on_batch("GET", f"{self.batches}/{bid}")

    async def cancel(self, bid: str) -> Remote:
        return await self._on_batch("POST", f"{self.batches}/{bid}/cancel")

    async def list(self, limit: int = 100) -> list[Remote]:
        out: list[Remote] = []
        after = ""
        while len(out) < limit:
            q = f"{self.batches}?limit={min(100, limit - len(out))}" + (
                f"&{self.after}={after}" if after else ""
            )
            status, raw = await self._json("GET", q)
            if status >= 300:
                raise failed("GET", self.base + self.batches, status, raw, self.key)
            page = decode(self.list_decoder, raw, "batch list")
            out += usable(self.remote, page.data)
            if not page.has_more or not page.data:
                break
            after = page.data[-1].id
        return out

    async def _fetch(self, url: str, out: BinaryIO) -> None:
        """``GET url`` streamed into ``out``; ``ControlError`` unless 2xx."""
        status, raw = await fetch(self.session, url, self.key, self.lane, out)
        if status >= 300:
            raise failed("GET", url, status, raw, self.key)
