"""Run directory: append-only JSONL shards per record kind, a manifest, and resume.

Layout (docs/concepts/run-directory.md)::

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

import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import orjson

from fairdistill.engine.errors import UsageError
from fairdistill.engine.rundir import index as idindex
from fairdistill.engine.rundir.idset import HashSet64, id_hash
from fairdistill.engine.rundir.reader import (
    ZST,
    check_version,
    decode_line,
    read_json,
    record_decoder,
    sha256,
    shard_lines,
)
from fairdistill.engine.rundir.schema import SCHEMA_VERSION, Record

R = TypeVar("R", bound=msgspec.Struct)
ZSTD_LEVEL = 3  # zstd's default: ~10x on JSONL at ~300 MB/s a core; level 9 gains ~5 %, at 1/4 the speed


class _IdOnly(msgspec.Struct):
    id: str


_id_only = msgspec.json.Decoder(_IdOnly)  # msgspec skips the rest of the line unparsed

_encoder = msgspec.json.Encoder()
_SHARD = re.compile(
    r"^shard-(?:(?P<writer>[\w.]+)-)?(?P<num>\d{5})\.jsonl(?:(?P<partial>\.partial)|(?P<zst>\.zst))?$"
)
COMPRESS = ("none", "zstd")  # ``run.compress``: sealed shards as ``.jsonl`` or ``.jsonl.zst``


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


def compress_shard(source: Path, target: Path) -> None:
    """Write ``source`` zstd-compressed to ``target`` (temporary file, fsync, rename), then
    remove ``source``: a kill in between leaves both, and ``shard_paths`` reads the ``.zst``."""
    import zstandard  # only runs that chose compression need it

    tmp = target.with_name(target.name + ".tmp")
    with open(source, "rb") as src, open(tmp, "wb") as dst:
        zstandard.ZstdCompressor(level=ZSTD_LEVEL).copy_stream(src, dst)
        dst.flush()
        os.fsync(dst.fileno())
    os.replace(tmp, target)
    _fsync_dir(target.parent)
    os.unlink(source)


def _compressed_leftover(path: Path) -> bool:
    """Remove ``path`` (a ``.partial`` shard) if its compressed copy was sealed before a kill
    could remove it; returns whether it was such a leftover."""
    if not path.with_name(path.name.removesuffix(".partial") + ZST).exists():
        return False
    path.unlink(missing_ok=True)
    return True


def shard_paths(root: Path, kind: str) -> list[Path]:
    """Every shard of a kind, sealed or partial, in name order."""
    folder = Path(root) / kind
    if not folder.is_dir():
        return []
    paths = sorted(p for p in folder.iterdir() if _SHARD.match(p.name))
    if not any(p.name.endswith(ZST) for p in paths):
        return paths
    # a shard compressed at its seal whose source was not yet removed (a kill in between): the
    # .zst is complete (written, fsynced, renamed first), the source is a leftover
    done = {p.name.removesuffix(ZST) for p in paths if p.name.endswith(ZST)}
    return [p for p in paths if p.name.removesuffix(".partial") not in done]


def iter_records(root: Path, kind: str, type: type[R] | None = None) -> Iterator[R]:
    """Read every record of a kind, decoded as ``type``, by the rules of ``engine.rundir.reader``
    (an unreadable line, or a torn one in a sealed shard: ``DamagedRunError`` naming ``file:line``;
    a newer schema: ``UsageError``)."""
    root = Path(root)
    read_manifest(root)  # a newer schema is refused before any record is read
    decoder = msgspec.json.Decoder(type) if type is not None else record_decoder(kind)
    for path in shard_paths(root, kind):
        for n, line in shard_lines(root, path):
            yield decode_line(root, path, n, line, decoder)


def iter_raw(root: Path, kind: str) -> Iterator[dict[str, Any]]:
    """Like ``iter_records`` but as plain dicts (for tools that do not know the schema); each
    line is checked against its folder's record type first, so a key the type requires is there."""
    root = Path(root)
    read_manifest(root)
    decoder = record_decoder(kind)
    for path in shard_paths(root, kind):
        for n, line in shard_lines(root, path):
            decode_line(root, path, n, line, decoder)
            yield orjson.loads(line)


class ShardWriter:
    """Appends lines to numbered shards ``<prefix>NNNNN.jsonl.partial``, sealing each (fsync,
    rename to ``.jsonl``) after ``max_records`` lines or on ``seal()``. The one shard writer:
    records (``write``: one syscall a line) and the trace (``append``: buffered, flushed every
    ``FLUSH_BYTES`` or ``FLUSH_AFTER_S``) both go through it. With ``compress = "zstd"`` a shard
    is compressed as it is sealed (``compress_shard``, on the caller's thread: ~40 ms for a
    50k-record shard, ~1 us a record); the shard being written stays plain JSONL."""

    FLUSH_BYTES = 64 * 1024
    FLUSH_AFTER_S = 1.0

    def __init__(self, folder: Path, writer: str, first_num: int, max_records: int, compress: str = "none"):
        """``compress = "zstd"``: each shard is compressed when sealed (``*.jsonl.zst``)."""
        self.folder = folder
        self.prefix = f"shard-{writer}-" if writer else "shard-"
        self.num = first_num
        self.max_records = max_records
        self.compress = compress
        self.fd: int | None = None
        self.path: Path | None = None
        self.in_shard = 0
        self.pending = bytearray()  # appended lines not yet written (``append``)
        self.pending_lines = 0
        self._flushed = time.monotonic()
        self.on_seal: Callable[[Path], None] | None = None  # called with each shard sealed

    @classmethod
    def resume(cls, folder: Path, writer: str, max_records: int) -> ShardWriter:
        """A writer after this writer's existing shards, its torn ``.partial`` ones sealed first."""
        folder.mkdir(parents=True, exist_ok=True)
        nums = []
        for path in folder.iterdir():
            m = _SHARD.match(path.name)
            if m is None or (m["writer"] or "") != writer:
                continue
            if m["partial"] and _compressed_leftover(path):
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
        final = self.path.with_name(self.path.name.removesuffix(".partial"))
        if self.compress == "zstd":
            final = final.with_name(final.name + ZST)
            compress_shard(self.path, final)
        else:
            os.replace(self.path, final)
        self.fd, self.path, self.in_shard = None, None, 0
        self.num += 1
        if self.on_seal is not None:
            self.on_seal(final)


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
        compress: str = "none",
    ):
        """``scope``: index only shards whose writer name starts with it (a Ray block sees its
        own epochs' records, not the whole run's); ``manifest``: where ``close`` writes the
        manifest (default ``RUN_DIR/manifest.json``; a block writes its own, the driver merges);
        ``compress``: ``"zstd"`` seals shards as ``*.jsonl.zst`` (``run.compress``)."""
        self.root = Path(root)
        self.compress = compress
        self.writer = writer
        self.shard_records = shard_records
        self.scope = scope
        self.manifest_path = manifest if manifest is not None else self.root / "manifest.json"
        self._ids: dict[str, idindex.StoredIds] = {}  # ~9 bytes an id (engine.rundir.index)
        self._listed: dict[str, dict[str, Any]] = {}  # the manifest's shard entries at open
        self._writers: dict[str, ShardWriter] = {}
        self._last_sync = time.monotonic()

    # -- lifecycle ---------------------------------------------------------------------------
    def open(self, kinds: list[str]) -> RunStore:
        """Create the folders, recover partial shards left by a crash, and index existing ids."""
        self.root.mkdir(parents=True, exist_ok=True)
        manifest = read_manifest(self.root)  # a newer schema is refused before anything is written
        shards = manifest.get("shards") if manifest else None
        self._listed = {
            e["path"]: e for e in shards or [] if isinstance(e, dict) and isinstance(e.get("path"), str)
        }
        for kind in kinds:
            folder = self.root / kind
            folder.mkdir(exist_ok=True)
            decoder = record_decoder(kind)
            if not os.access(folder, os.W_OK | os.X_OK):  # else a worker fails mid-run, deep down
                raise UsageError(f"{folder}: not writable; fix its permissions or use another run directory")
            nums = []
            paths = []
            for path in folder.glob("*.jsonl.partial"):
                m = _SHARD.match(path.name)
                if m is not None and (m["writer"] or "") == self.writer:
                    _compressed_leftover(path)
            for path in shard_paths(self.root, kind):
                m = _SHARD.match(path.name)
                assert m is not None
                if m["partial"] and (m["writer"] or "") == self.writer:
                    path = recover_partial(path)
                if (m["writer"] or "") == self.writer:
                    nums.append(int(m["num"]))
                if self.scope is not None and not (m["writer"] or "").startswith(self.scope):
                    continue
                paths.append(path)
            self._ids[kind] = self._index(kind, paths, manifest, decoder)
            first = max(nums) + 1 if nums else 0
            self._writers[kind] = ShardWriter(folder, self.writer, first, self.shard_records, self.compress)
        _fsync_dir(self.root)
        return self

    def _index(
        self, kind: str, paths: list[Path], manifest: dict[str, Any] | None, decoder
    ) -> idindex.StoredIds:
        """The ids of ``kind``: the saved index where it fits (``engine.rundir.index``), plus
        every shard it does not cover, read line by line by the rules of ``engine.rundir.reader``."""
        hashes, covered = (
            idindex.load(self.root, kind, manifest, paths) if self.scope is None else (HashSet64(), set())
        )
        todo = [p for p in paths if str(p.relative_to(self.root)) not in covered]
        found = (
            id_hash(decode_line(self.root, path, n, line, decoder).id)
            for path in todo
            for n, line in shard_lines(self.root, path)
        )
        if len(hashes):
            for h in found:
                hashes.add(h)
        else:  # sized from the bytes (a line is >= ~64 bytes, ~10x less compressed): buckets stay small
            guess = sum(p.stat().st_size * (10 if p.name.endswith(ZST) else 1) for p in todo) // 64
            hashes = HashSet64.build(found, guess)
        return idindex.StoredIds(hashes, lambda: self._iter_ids(kind))

    def _iter_ids(self, kind: str) -> Iterator[str]:
        """The id strings of ``kind`` read back from its shards (in scope)."""
        for path in shard_paths(self.root, kind):
            if self._in_scope(path):
                for _, line in shard_lines(self.root, path):
                    yield _id_only.decode(line).id

    def close(self, status: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Seal every shard and write the manifest with counts and checksums."""
        for w in self._writers.values():
            w.seal()
        return self.write_manifest(status, extra)

    # -- records -----------------------------------------------------------------------------
    def has(self, kind: str, record_id: str) -> bool:
        return record_id in self._ids[kind]

    def ids(self, kind: str) -> idindex.StoredIds:
        """``in`` and ``len`` from memory; iterating reads the ids back from the shards."""
        return self._ids[kind]

    def count(self, kind: str) -> int:
        return len(self._ids[kind])

    def write(self, kind: str, record: Record) -> bool:
        """Append a record unless its id is already there; returns whether it was written."""
        hashes = self._ids[kind].hashes
        h = id_hash(record.id)
        if not hashes.add(h):  # the look-up and the add in one
            return False
        try:
            self._writers[kind].write(_encoder.encode(record) + b"\n")
        except BaseException:
            hashes.discard(h)  # not written: not there
            raise
        now = time.monotonic()
        if now - self._last_sync > 5.0:  # bound what a power loss (not a SIGKILL) could cost
            self._last_sync = now
            for w in self._writers.values():
                w.sync()
        return True

    # -- manifest ----------------------------------------------------------------------------
    def write_manifest(self, status: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        shards: list[dict[str, Any]] = []
        counts: dict[str, int] = {}
        for kind in self._ids:
            counts[kind] = len(self._ids[kind])
            for path in shard_paths(self.root, kind):
                if path.name.endswith(".partial") or not self._in_scope(path):
                    continue
                rel, size = str(path.relative_to(self.root)), path.stat().st_size
                known = self._listed.get(rel)  # a sealed shard is never rewritten: reuse its digest
                digest = known["sha256"] if known and known.get("bytes") == size else sha256(path)
                shards.append({"kind": kind, "path": rel, "sha256": digest, "bytes": size})
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "status": status,
            "counts": counts,
            "shards": shards,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **(extra or {}),
        }
        atomic_write(self.manifest_path, orjson.dumps(manifest, option=orjson.OPT_INDENT_2))
        self._listed = {s["path"]: s for s in shards}
        if self.scope is None and self.manifest_path == self.root / "manifest.json":
            for kind, ids in self._ids.items():  # every shard sealed: the index covers them all
                if not any(p.name.endswith(".partial") for p in shard_paths(self.root, kind)):
                    idindex.save(self.root, kind, [s for s in shards if s["kind"] == kind], ids.hashes)
        return manifest

    def _in_scope(self, path: Path) -> bool:
        m = _SHARD.match(path.name)
        return self.scope is None or (m is not None and (m["writer"] or "").startswith(self.scope))


def read_manifest(root: str | Path) -> dict[str, Any] | None:
    """``manifest.json`` (None if absent); ``DamagedRunError`` if unreadable, ``UsageError``
    naming both versions if a newer fairdistill wrote it."""
    manifest = read_json(Path(root), Path(root) / "manifest.json")
    if manifest is not None:
        check_version(Path(root), manifest)
    return manifest
