"""Content-addressed response cache in embedded SQLite.

Key = sha256 of the canonical JSON (sorted keys) of what determines an answer: provider,
base URL, model, messages, sampling parameters and ``sample_index``. Value = the
``Completion`` as JSON. Identical requests are answered from here for free, so a resumed run
or a changed threshold pays nothing twice. The file is safe to delete.

Reads run on the event loop. The 8-byte prefixes of every stored key are held in memory
(``KeyPrefixes``, 16-32 bytes a key), so a miss (the common case on a fresh run) costs a
lookup there, not a query (a query costs 30-50 us here while the writer thread commits); a hit is
a primary-key lookup. Entries that another process adds while we run are not known here: at
worst a call is paid twice. Writes are buffered
in memory (and visible to ``get`` at once) and committed in batches on a worker thread, so the
loop never waits for a disk sync, unless the worker falls behind: past ``MAX_BUFFERED`` entries
``put`` commits on the loop (without that bound the buffer held every entry of a fast run, ~450 B
each, 75 MB over 200k calls). Memory per cached call: the key prefix (16-32 B), nothing else
that grows; SQLite's page cache is capped at ``PAGE_CACHE_KB`` per connection. WAL journal:
a SIGKILL loses at most the last uncommitted
batch; a committed entry always survives, and a half-written one is simply absent.
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import sys
import threading
import time
from array import array
from collections.abc import Iterable
from pathlib import Path

import msgspec
import orjson

from engine.types import ChatRequest, Completion

FLUSH_EVERY = 256  # entries
FLUSH_AFTER_S = 0.5  # seconds since the oldest buffered entry
MAX_BUFFERED = 8 * FLUSH_EVERY  # past this, ``put`` commits on the loop: the writer has fallen behind
PAGE_CACHE_KB = 1024  # SQLite page cache per connection (its default is 2 MB)

_value_encoder = msgspec.json.Encoder()
_value_decoder = msgspec.json.Decoder(Completion)


def cache_key(provider: str, base_url: str, model: str, request: ChatRequest) -> bytes:
    """sha256 of the canonical JSON of everything that determines the answer."""
    doc = {
        "provider": provider,
        "base_url": base_url.rstrip("/"),
        "model": model,
        "messages": [[m.role, m.content] for m in request.messages],
        "max_tokens": request.max_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "n": request.n,
        "seed": request.seed,
        "stop": request.stop,
        "sample_index": request.sample_index,
    }
    return hashlib.sha256(orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)).digest()


class KeyPrefixes:
    """A set of keys by their first 8 bytes, in 16-32 bytes a key: an open-addressing table
    (linear probing) of those bytes as integers in an ``array("Q")``, at most half full, 0 marking
    an empty slot. The keys are sha256 digests, so their bits are already uniform. A plain set of
    the prefixes costs ~75 bytes a key: 15 MB for 200k cached calls."""

    __slots__ = ("_mask", "_n", "_table")

    def __init__(self, keys: Iterable[bytes] = ()):
        self._table = array("Q", bytes(8 * 1024))
        self._mask = 1023
        self._n = 0
        for key in keys:
            self.add(key)

    def _slot(self, p: int) -> int:
        table, mask = self._table, self._mask
        i = p & mask
        while (v := table[i]) and v != p:
            i = (i + 1) & mask
        return i

    def add(self, key: bytes) -> None:
        p = _prefix(key)
        i = self._slot(p)
        if self._table[i] == p:
            return
        self._table[i] = p
        self._n += 1
        if 2 * self._n > len(self._table):
            old = self._table
            self._table = array("Q", bytes(16 * len(old)))
            self._mask = 2 * len(old) - 1
            for v in old:
                if v:
                    self._table[self._slot(v)] = v

    def __contains__(self, key: bytes) -> bool:
        p = _prefix(key)
        return self._table[self._slot(p)] == p


def _prefix(key: bytes) -> int:
    return int.from_bytes(key[:8], "big") or 1  # 0 marks an empty slot


class ResponseCache:
    """``get`` / ``put`` by key; ``close`` commits what is buffered. One per process."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._open()
        except sqlite3.DatabaseError as exc:  # not a database (torn, overwritten): only a cache
            aside = self.path.with_name(f"{self.path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
            self.path.rename(aside)
            print(f"fair: {self.path}: unreadable cache ({exc}), moved to {aside.name}; starting a new one",
                  file=sys.stderr)  # fmt: skip
            self._open()
        self._pending: dict[bytes, bytes] = {}
        self._writing: dict[bytes, bytes] = {}  # the batch the worker is committing now
        self._oldest = 0.0
        self._lock = threading.Lock()  # one writer at a time (the worker thread, or close())
        self._writer: sqlite3.Connection | None = None
        self._flushing: asyncio.Future | None = None
        self.hits = 0
        self.misses = 0
        self.write_error: str | None = None

    def _open(self) -> None:
        self._db = self._connect()
        try:
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS responses (key BLOB PRIMARY KEY, value BLOB NOT NULL, "
                "created REAL NOT NULL) WITHOUT ROWID"
            )
            self._db.commit()
            self._known = KeyPrefixes(k for (k,) in self._db.execute("SELECT key FROM responses"))
        except sqlite3.DatabaseError:
            self._db.close()
            raise

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process kills
            db.execute("PRAGMA busy_timeout=5000")
            db.execute(f"PRAGMA cache_size=-{PAGE_CACHE_KB}")
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    def __repr__(self) -> str:
        return f"ResponseCache({str(self.path)!r})"

    # -- read -------------------------------------------------------------------------------
    def get(self, key: bytes) -> Completion | None:
        raw = self._pending.get(key) or self._writing.get(key)
        if raw is None:
            if key not in self._known:
                self.misses += 1
                return None
            row = self._db.execute("SELECT value FROM responses WHERE key = ?", (key,)).fetchone()
            if row is None:
                self.misses += 1
                return None
            raw = row[0]
        try:
            hit = _value_decoder.decode(raw)
        except msgspec.DecodeError:  # unreadable entry (an older format): treat as a miss
            self.misses += 1
            return None
        self.hits += 1
        return hit

    # -- write ------------------------------------------------------------------------------
    def put(self, key: bytes, completion: Completion) -> None:
        """Buffer an entry; batches are committed off the event loop."""
        if not self._pending:
            self._oldest = time.monotonic()
        self._pending[key] = _value_encoder.encode(completion)
        self._known.add(key)
        if len(self._pending) >= FLUSH_EVERY or time.monotonic() - self._oldest > FLUSH_AFTER_S:
            self._flush_soon()
            if len(self._pending) >= MAX_BUFFERED:  # backpressure: the buffer stays bounded
                batch, self._pending = self._pending, {}
                self._write(batch)

    def _flush_soon(self) -> None:
        if self._flushing is not None and not self._flushing.done():
            return  # one batch in flight at a time; the next put triggers the next one
        batch, self._pending = self._pending, {}
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._write(batch)
            return
        self._writing = batch
        self._flushing = loop.run_in_executor(None, self._write, batch)
        self._flushing.add_done_callback(self._written)

    def _written(self, fut: asyncio.Future) -> None:
        self._writing = {}
        if not fut.cancelled() and fut.exception() is not None and not self.write_error:
            # the cache is an optimisation: a failing disk must not fail the run
            self.write_error = repr(fut.exception())
            print(f"fair: response cache {self.path}: write failed: {self.write_error}", file=sys.stderr)

    def _write(self, batch: dict[bytes, bytes]) -> None:
        if not batch:
            return
        now = time.time()
        rows = [(k, v, now) for k, v in batch.items()]
        with self._lock:
            if self._writer is None:
                self._writer = self._connect()
            db = self._writer
            db.execute("BEGIN")
            try:
                db.executemany(
                    "INSERT OR REPLACE INTO responses (key, value, created) VALUES (?, ?, ?)", rows
                )
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    async def flush(self) -> None:
        """Commit everything buffered so far."""
        if self._flushing is not None and not self._flushing.done():
            await asyncio.wait([self._flushing])
        batch, self._pending = self._pending, {}
        if batch:
            await asyncio.get_running_loop().run_in_executor(None, self._write, batch)

    def close(self) -> None:
        """Commit what is left and close. Synchronous; waits for a batch the worker is writing."""
        batch, self._pending = self._pending, {}
        try:
            self._write(batch)
        finally:
            with self._lock:
                if self._writer is not None:
                    self._writer.close()
                    self._writer = None
            self._db.close()

    def __len__(self) -> int:
        n = self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
        return n + len(self._pending)
