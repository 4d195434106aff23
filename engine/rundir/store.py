"""Run directory: append-only JSONL shards per record kind, a manifest, and resume.

Layout (DESIGN.md section 4)::

    RUN_DIR/<kind>/shard-00000.jsonl      sealed shards
    RUN_DIR/<kind>/shard-00001.jsonl.partial   the shard being written
    RUN_DIR/manifest.json

A record is one ``write`` syscall, so a SIGKILL loses nothing that was written; a torn last
line of a ``.partial`` shard is cut when the store is opened again, and the shard is sealed
(fsynced and renamed). Ids already present are skipped, so resume never duplicates a record.
Several writers (e.g. Ray workers) may share a run directory: each passes its own ``writer``
name and writes its own shards. ``ShardWriter`` is the one shard writer: the call trace
(``RUN_DIR/trace/``) is written through it too, with the same ``.partial`` + rename.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import orjson

from engine.errors import DamagedRunError
from engine.rundir.schema import KINDS, SCHEMA_VERSION, Record

R = TypeVar("R", bound=msgspec.Struct)

_encoder = msgspec.json.Encoder()
_SHARD = re.compile(r"^shard-(?:(?P<writer>[\w.]+)-)?(?P<num>\d{5})\.jsonl(?P<partial>\.partial)?$")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see the old or the new file, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def recover_partial(path: Path) -> Path:
    """Cut a torn last line from a ``.partial`` shard, fsync it and seal it under its final name."""
    with open(path, "rb+") as f:
        data = f.read()
        keep = data.rfind(b"\n") + 1
        if keep != len(data):
            f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    final = path.with_name(path.name.removesuffix(".partial"))
    os.replace(path, final)
    return final


def shard_paths(root: Path, kind: str) -> list[Path]:
    """Every shard of a kind, sealed or partial, in name order."""
    folder = Path(root) / kind
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _SHARD.match(p.name))


def iter_records(root: Path, kind: str, type: type[R] | None = None) -> Iterator[R]:
    """Read every complete record of a kind (a torn last line is ignored), decoded as ``type``.
    An unreadable line raises ``DamagedRunError`` naming ``file:line`` (``fair repair`` fixes it)."""
    decoder = msgspec.json.Decoder(type or KINDS[kind])
    for path in shard_paths(root, kind):
        with open(path, "rb") as f:
            for n, line in enumerate(f, 1):
                if line.endswith(b"\n"):
                    try:
                        yield decoder.decode(line)
                    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
                        raise _damaged(root, path, n, exc) from None


def iter_raw(root: Path, kind: str) -> Iterator[dict[str, Any]]:
    """Like ``iter_records`` but as plain dicts (for tools that do not know the schema)."""
    for path in shard_paths(root, kind):
        with open(path, "rb") as f:
            for n, line in enumerate(f, 1):
                if line.endswith(b"\n"):
                    yield read_line(root, path, n, line)


def read_line(root: Path, path: Path, n: int, line: bytes, *, need_id: bool = False) -> dict[str, Any]:
    """One shard line as a dict (with a string ``id`` if ``need_id``); else ``DamagedRunError``
    naming ``path:n``."""
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise _damaged(root, path, n, exc) from None
    if not isinstance(value, dict) or (need_id and not isinstance(value.get("id"), str)):
        raise _damaged(root, path, n, "not a record with an `id`" if need_id else "not a JSON object")
    return value


def _damaged(root: Path, path: Path, n: int, why: object) -> DamagedRunError:
    text = str(why).splitlines()[0][:120] if str(why) else type(why).__name__
    return DamagedRunError(f"{path}:{n}", f"unreadable line: {text}", str(root))


class ShardWriter:
    """Appends lines to numbered shards ``<prefix>NNNNN.jsonl.partial``, sealing each (fsync,
    rename to ``.jsonl``) after ``max_records`` lines or on ``seal()``. The one shard writer:
    records (``write``: one syscall a line) and the trace (``append``: buffered, flushed every
    ``FLUSH_BYTES`` or ``FLUSH_AFTER_S``) both go through it."""

    FLUSH_BYTES = 64 * 1024
    FLUSH_AFTER_S = 1.0

    def __init__(self, folder: Path, writer: str, first_num: int, max_records: int):
        self.folder = folder
        self.prefix = f"shard-{writer}-" if writer else "shard-"
        self.num = first_num
        self.max_records = max_records
        self.fd: int | None = None
        self.path: Path | None = None
        self.in_shard = 0
        self.pending = bytearray()  # appended lines not yet written (``append``)
        self.pending_lines = 0
        self._flushed = time.monotonic()

    @classmethod
    def resume(cls, folder: Path, writer: str, max_records: int) -> ShardWriter:
        """A writer after this writer's existing shards, its torn ``.partial`` ones sealed first."""
        folder.mkdir(parents=True, exist_ok=True)
        nums = []
        for path in folder.iterdir():
            m = _SHARD.match(path.name)
            if m is None or (m["writer"] or "") != writer:
                continue
            if m["partial"]:
                recover_partial(path)
            nums.append(int(m["num"]))
        return cls(folder, writer, max(nums, default=-1) + 1, max_records)

    def _open(self) -> int:
        if self.fd is None:
            self.path = self.folder / f"{self.prefix}{self.num:05d}.jsonl.partial"
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        return self.fd

    def write(self, line: bytes) -> None:
        """One line, one ``write`` syscall: a SIGKILL never loses a line written."""
        os.write(self._open(), line)
        self.in_shard += 1
        if self.in_shard >= self.max_records:
            self.seal()

    def append(self, line: bytes = b"") -> None:
        """Buffer a line (or count one the caller encoded into ``pending``); written in batches."""
        if line:
            self.pending += line
        self.pending_lines += 1
        if len(self.pending) >= self.FLUSH_BYTES or time.monotonic() - self._flushed > self.FLUSH_AFTER_S:
            self.flush()

    def flush(self) -> None:
        self._flushed = time.monotonic()
        if not self.pending:
            return
        data = bytes(self.pending)
        self.pending.clear()
        fd = self._open()
        done = 0
        while done < len(data):
            done += os.write(fd, data[done:])
        self.in_shard += self.pending_lines
        self.pending_lines = 0
        if self.in_shard >= self.max_records:
            self.seal()

    def sync(self) -> None:
        if self.fd is not None:
            os.fsync(self.fd)

    def seal(self) -> None:
        self.flush()
        if self.fd is None or self.path is None:
            return
        os.fsync(self.fd)
        os.close(self.fd)
        os.replace(self.path, self.path.with_name(self.path.name.removesuffix(".partial")))
        self.fd, self.path, self.in_shard = None, None, 0
        self.num += 1


class RunStore:
    """The writing side of a run directory. Open, write records, close with a status."""

    def __init__(
        self,
        root: str | Path,
        *,
        writer: str = "",
        shard_records: int = 50_000,
        scope: str | None = None,
        manifest: Path | None = None,
    ):
        """``scope``: index only shards whose writer name starts with it (a Ray block sees its
        own epochs' records, not the whole run's); ``manifest``: where ``close`` writes the
        manifest (default ``RUN_DIR/manifest.json``; a block writes its own, the driver merges)."""
        self.root = Path(root)
        self.writer = writer
        self.shard_records = shard_records
        self.scope = scope
        self.manifest_path = manifest if manifest is not None else self.root / "manifest.json"
        self._ids: dict[str, set[str]] = {}
        self._writers: dict[str, ShardWriter] = {}
        self._last_sync = time.monotonic()

    # -- lifecycle ---------------------------------------------------------------------------
    def open(self, kinds: list[str]) -> RunStore:
        """Create the folders, recover partial shards left by a crash, and index existing ids."""
        self.root.mkdir(parents=True, exist_ok=True)
        for kind in kinds:
            folder = self.root / kind
            folder.mkdir(exist_ok=True)
            nums = []
            ids: set[str] = set()
            for path in shard_paths(self.root, kind):
                m = _SHARD.match(path.name)
                assert m is not None
                if m["partial"] and (m["writer"] or "") == self.writer:
                    path = recover_partial(path)
                if (m["writer"] or "") == self.writer:
                    nums.append(int(m["num"]))
                if self.scope is not None and not (m["writer"] or "").startswith(self.scope):
                    continue
                with open(path, "rb") as f:
                    for n, line in enumerate(f, 1):
                        if line.endswith(b"\n"):
                            ids.add(read_line(self.root, path, n, line, need_id=True)["id"])
            self._ids[kind] = ids
            first = max(nums) + 1 if nums else 0
            self._writers[kind] = ShardWriter(folder, self.writer, first, self.shard_records)
        _fsync_dir(self.root)
        return self

    def close(self, status: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Seal every shard and write the manifest with counts and checksums."""
        for w in self._writers.values():
            w.seal()
        return self.write_manifest(status, extra)

    # -- records -----------------------------------------------------------------------------
    def has(self, kind: str, record_id: str) -> bool:
        return record_id in self._ids[kind]

    def ids(self, kind: str) -> set[str]:
        return self._ids[kind]

    def count(self, kind: str) -> int:
        return len(self._ids[kind])

    def write(self, kind: str, record: Record) -> bool:
        """Append a record unless its id is already there; returns whether it was written."""
        ids = self._ids[kind]
        if record.id in ids:
            return False
        self._writers[kind].write(_encoder.encode(record) + b"\n")
        ids.add(record.id)
        now = time.monotonic()
        if now - self._last_sync > 5.0:  # bound what a power loss (not a SIGKILL) could cost
            self._last_sync = now
            for w in self._writers.values():
                w.sync()
        return True

    # -- manifest ----------------------------------------------------------------------------
    def write_manifest(self, status: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        shards = []
        counts: dict[str, int] = {}
        for kind in self._ids:
            counts[kind] = len(self._ids[kind])
            for path in shard_paths(self.root, kind):
                if path.name.endswith(".partial") or not self._in_scope(path):
                    continue
                shards.append(
                    {
                        "kind": kind,
                        "path": str(path.relative_to(self.root)),
                        "sha256": _sha256(path),
                        "bytes": path.stat().st_size,
                    }
                )
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "status": status,
            "counts": counts,
            "shards": shards,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **(extra or {}),
        }
        atomic_write(self.manifest_path, orjson.dumps(manifest, option=orjson.OPT_INDENT_2))
        return manifest

    def _in_scope(self, path: Path) -> bool:
        m = _SHARD.match(path.name)
        return self.scope is None or (m is not None and (m["writer"] or "").startswith(self.scope))


def read_manifest(root: str | Path) -> dict[str, Any] | None:
    path = Path(root) / "manifest.json"
    if not path.exists():
        return None
    try:
        manifest = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise DamagedRunError(f"{path}:{exc.lineno}", f"not valid JSON: {exc.msg}", str(root)) from None
    if not isinstance(manifest, dict):
        raise DamagedRunError(f"{path}:1", "not a JSON object", str(root))
    return manifest


def _sha256(path: Path) -> str:
    """A shard's digest, read in chunks (shards can be larger than memory should hold)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
