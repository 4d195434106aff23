"""Content-addressed response cache in embedded SQLite.

Key = sha256 of the canonical JSON (sorted keys) of what determines an answer: provider,
base URL, model, messages, sampling parameters and ``sample_index``. Value = the
``Completion`` as JSON, zstd-compressed against a fixed dictionary (``_Z1_DICT``: ~40 bytes
for a short answer instead of ~320; plain JSON values of older caches are still read).
Identical requests are answered from here for free, so a resumed run or a changed threshold
pays nothing twice. The file is safe to delete.

Durable at once: ``put`` hands the answer to one writer thread, which commits whatever has
arrived as one transaction the moment it is free (group commit; WAL with ``synchronous=NORMAL``
makes a commit a write to the WAL file, no fsync, ~0.1 ms), many rows per ``INSERT`` statement. An
answer is therefore on disk a few milliseconds after it arrives (``commit_lag_s`` measures it), and a
SIGKILL re-pays only the calls in flight at the kill plus those answered in that last moment.
The event loop never waits for the disk, unless the writer falls ``MAX_BUFFERED`` entries
behind (back-pressure).

Reads run on the event loop. The first 8 bytes of every stored key are held in a
``HashSet64`` (~9 bytes a key), so a miss (the common case on a fresh run) costs a lookup there,
not a query; a hit there is confirmed by a primary-key query (two keys sharing 8 bytes are told
apart on disk). Entries that another process adds while we run are not known here: at worst a
call is paid twice. SQLite's page cache is capped at ``PAGE_CACHE_KB`` per connection.

A ``cache.sqlite`` that cannot be written (read-only file or folder) is a ``UsageError`` naming
it (exit 2); one that is not a database is moved aside and a new one started.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
import queue
import sqlite3
import sys
import threading
import time
from pathlib import Path

import msgspec
import orjson
import zstandard

from fairdistill.engine.errors import UsageError
from fairdistill.engine.rundir.idset import HashSet64, key_hash
from fairdistill.engine.types import ChatRequest, Completion

INSERT_ROWS = 256  # rows per INSERT statement (3 parameters each; SQLite allows 32766)
MAX_BUFFERED = 4096  # entries handed to the writer and not yet committed: past this ``put`` waits
PAGE_CACHE_KB = 1024  # SQLite page cache per connection (its default is 2 MB)

_value_encoder = msgspec.json.Encoder()
_value_decoder = msgspec.json.Decoder(Completion)

# Values are stored zstd-compressed against this fixed dictionary (the shape of an encoded
# ``Completion``): ~40 bytes instead of ~320 for a short answer, where plain zstd gains little on
# so small a value. ``Z1`` marks the format; never change this text (it would make the entries
# written with it unreadable: misses, paid again), add a ``Z2`` beside it instead.
_Z1 = b"Z1"
_Z1_DICT = (
    b'{"choices":[{"text":"","finish_reason":"stop","reasoning":null}],"usage":{"prompt_tokens":0,'
    b'"completion_tokens":0,"reasoning_tokens":0,"cached_tokens":0,"cache_write_tokens":0},'
    b'"model":"","cached":false,"latency_s":0.0,"attempts":1,"cost_usd":0.0}'
)


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


class ResponseCache:
    """``get`` / ``put`` by key; ``close`` commits what is left. One per process."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _check_writable(self.path)
        try:
            self._open()
        except sqlite3.DatabaseError as exc:  # not a database (torn, overwritten): only a cache
            _raise_if_read_only(self.path, exc)
            aside = self.path.with_name(f"{self.path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
            self.path.rename(aside)
            print(f"fair: {self.path}: unreadable cache ({exc}), moved to {aside.name}; starting a new one",
                  file=sys.stderr)  # fmt: skip
            self._open()
        self._pending: dict[bytes, bytes] = {}  # handed to the writer, not committed yet
        self._queue: queue.SimpleQueue[tuple[bytes, bytes, float] | threading.Event | None]
        self._queue = queue.SimpleQueue()
        self._room = threading.Condition()
        self._thread: threading.Thread | None = None
        self.hits = 0
        self.misses = 0
        self.committed = 0
        self.commit_lag_s = 0.0  # the longest time an answer waited for its commit
        self.write_error: str | None = None
        self._unzip = zstandard.ZstdDecompressor(dict_data=_zdict())  # the loop's (not thread-safe)

    def _open(self) -> None:
        self._db = self._connect()
        try:
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS responses (key BLOB PRIMARY KEY, value BLOB NOT NULL, "
                "created REAL NOT NULL) WITHOUT ROWID"
            )
            self._known = HashSet64.build(
                (key_hash(k) for (k,) in self._db.execute("SELECT key FROM responses")),
                self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0],
            )
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
        raw = self._pending.get(key)
        if raw is None:
            if key_hash(key) not in self._known:
                self.misses += 1
                return None
            row = self._db.execute("SELECT value FROM responses WHERE key = ?", (key,)).fetchone()
            if row is None:  # 8 bytes shared with another key, or its commit failed
                self.misses += 1
                return None
            raw = row[0]
        try:
            hit = _value_decoder.decode(self._unpack(raw))
        except (msgspec.DecodeError, zstandard.ZstdError):  # unreadable entry: treat as a miss
            self.misses += 1
            return None
        self.hits += 1
        return hit

    def _unpack(self, raw: bytes) -> bytes:
        if not raw.startswith(_Z1):
            return raw  # written uncompressed (an older cache, or a value still in ``_pending``)
        return self._unzip.decompress(raw[len(_Z1) :])

    # -- write ------------------------------------------------------------------------------
    def put(self, key: bytes, completion: Completion) -> None:
        """Hand an entry to the writer thread, which commits it within milliseconds."""
        raw = _value_encoder.encode(completion)
        self._pending[key] = raw
        self._known.add(key_hash(key))
        if self._thread is None:
            self._thread = threading.Thread(target=self._writer, name="fair-cache-writer", daemon=True)
            self._thread.start()
        self._queue.put((key, raw, time.monotonic()))
        if len(self._pending) >= MAX_BUFFERED:  # back-pressure: the writer has fallen behind
            with self._room:
                self._room.wait_for(lambda: len(self._pending) < MAX_BUFFERED // 2, timeout=30)

    def _writer(self) -> None:
        """Commit whatever has arrived, as one transaction, until told to stop (``None``)."""
        try:
            db: sqlite3.Connection | None = self._connect()
        except sqlite3.Error as exc:  # the entries are dropped, the run goes on (they are paid again)
            db = None
            self._failed(exc)
        zip_ = zstandard.ZstdCompressor(
            level=3, dict_data=_zdict(), write_checksum=False, write_dict_id=False
        )
        try:
            while True:
                batch = [self._queue.get()]
                while True:
                    try:
                        batch.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                self._commit(db, zip_, [item for item in batch if isinstance(item, tuple)])
                for item in batch:
                    if isinstance(item, threading.Event):
                        item.set()
                if None in batch:
                    return
        finally:
            if db is not None:
                db.close()

    def _commit(self, db: sqlite3.Connection | None, zip_, rows: list[tuple[bytes, bytes, float]]) -> None:
        """Insert ``rows`` (compressed) in one transaction, then forget them from ``_pending``."""
        if not rows:
            return
        try:
            if db is None:
                raise sqlite3.OperationalError("not open")
            now = time.time()
            packed = [(k, _Z1 + zip_.compress(v), now) for k, v, _ in rows]
            db.execute("BEGIN")
            try:
                _insert(db, packed)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        except Exception as exc:  # the cache is an optimisation: a failing disk must not fail the run
            self._failed(exc)
        else:
            self.committed += len(rows)
            self.commit_lag_s = max(self.commit_lag_s, time.monotonic() - min(t for _, _, t in rows))
        pending = self._pending
        for k, v, _ in rows:
            if pending.get(k) is v:
                del pending[k]
        with self._room:
            self._room.notify_all()

    def _failed(self, exc: Exception) -> None:
        if not self.write_error:
            self.write_error = repr(exc)
            print(f"fair: response cache {self.path}: write failed: {self.write_error}", file=sys.stderr)

    def _barrier(self) -> threading.Event:
        done = threading.Event()
        if self._thread is None or not self._thread.is_alive():
            done.set()
        else:
            self._queue.put(done)
        return done

    async def flush(self) -> None:
        """Wait until everything put so far is committed (off the event loop)."""
        done = self._barrier()
        if not done.is_set():
            await asyncio.get_running_loop().run_in_executor(None, done.wait)

    def close(self) -> None:
        """Commit what is left, stop the writer and close. Synchronous."""
        try:
            if self._thread is not None:
                self._queue.put(None)
                self._thread.join()
                self._thread = None
        finally:
            self._db.close()

    def __len__(self) -> int:
        n = self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
        return n + len(self._pending)


def _insert(db: sqlite3.Connection, rows: list[tuple[bytes, bytes, float]]) -> None:
    """``INSERT OR REPLACE`` the rows, many per statement: ``executemany`` steps (and hands
    the GIL back and forth with the event loop) once per row, this once per ``INSERT_ROWS``
    rows. Chunks are powers of two, so a handful of statements are prepared and cached."""
    i = 0
    while i < len(rows):
        size = min(INSERT_ROWS, 1 << (len(rows) - i).bit_length() - 1)
        db.execute(_insert_sql(size), [x for row in rows[i : i + size] for x in row])
        i += size


@functools.cache
def _insert_sql(rows: int) -> str:
    values = ", ".join(["(?, ?, ?)"] * rows)
    return f"INSERT OR REPLACE INTO responses (key, value, created) VALUES {values}"


def _zdict() -> zstandard.ZstdCompressionDict:
    return zstandard.ZstdCompressionDict(_Z1_DICT, dict_type=zstandard.DICT_TYPE_RAWCONTENT)


def looks_usable(path: Path) -> bool:
    """Whether opening ``path`` would go quietly: absent, or an SQLite file that can be written
    (a cheap look at its first 16 bytes and its mode, not an open: that reads every key)."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
        return head in (b"", b"SQLite format 3\x00") and bool(path.stat().st_mode & 0o222)
    except FileNotFoundError:
        return True
    except OSError:
        return False


def _check_writable(path: Path) -> None:
    """A cache file or folder without write permission is the user's choice, not damage: say
    so (exit 2) instead of failing at the first commit or moving the file aside."""
    for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        if p.exists() and not (p.stat().st_mode & 0o222 and os.access(p, os.W_OK)):
            raise UsageError(f"{p}: read-only; the response cache needs to write it (make it writable, "
                             "move it away, or run without the cache)")  # fmt: skip
    folder = path.parent
    if not path.exists() and not (folder.stat().st_mode & 0o222 and os.access(folder, os.W_OK)):
        raise UsageError(f"{folder}: read-only folder; the response cache {path.name} cannot be created")


def _raise_if_read_only(path: Path, exc: sqlite3.DatabaseError) -> None:
    if "readonly" in str(exc).replace("-", "").replace(" ", "") or "read-only" in str(exc):
        raise UsageError(f"{path}: read-only ({exc}); the response cache needs to write it") from None
