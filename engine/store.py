"""Run directory: append-only JSONL shards per record kind, a manifest, and resume.

Layout (DESIGN.md section 4)::

    RUN_DIR/<kind>/shard-00000.jsonl      sealed shards
    RUN_DIR/<kind>/shard-00001.jsonl.partial   the shard being written
    RUN_DIR/manifest.json

A record is one ``write`` syscall, so a SIGKILL loses nothing that was written; a torn last
line of a ``.partial`` shard is cut when the store is opened again, and the shard is sealed
(fsynced and renamed). Ids already present are skipped, so resume never duplicates a record.
Several writers (e.g. Ray workers) may share a run directory: each passes its own ``writer``
name and writes its own shards.
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

from engine.schema import KINDS, SCHEMA_VERSION, Record

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
    """Read every complete record of a kind (a torn last line is ignored), decoded as ``type``."""
    decoder = msgspec.json.Decoder(type or KINDS[kind])
    for path in shard_paths(root, kind):
        with open(path, "rb") as f:
            for line in f:
                if line.endswith(b"\n"):
                    yield decoder.decode(line)


def iter_raw(root: Path, kind: str) -> Iterator[dict[str, Any]]:
    """Like ``iter_records`` but as plain dicts (for tools that do not know the schema)."""
    for path in shard_paths(root, kind):
        with open(path, "rb") as f:
            for line in f:
                if line.endswith(b"\n"):
                    yield orjson.loads(line)


class _ShardWriter:
    """Appends records of one kind to numbered shards, rotating after ``max_records``."""

    def __init__(self, folder: Path, writer: str, first_num: int, max_records: int):
        self.folder = folder
        self.prefix = f"shard-{writer}-" if writer else "shard-"
        self.num = first_num
        self.max_records = max_records
        self.fd: int | None = None
        self.path: Path | None = None
        self.in_shard = 0

    def write(self, line: bytes) -> None:
        if self.fd is None:
            self.path = self.folder / f"{self.prefix}{self.num:05d}.jsonl.partial"
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.write(self.fd, line)
        self.in_shard += 1
        if self.in_shard >= self.max_records:
            self.seal()

    def sync(self) -> None:
        if self.fd is not None:
            os.fsync(self.fd)

    def seal(self) -> None:
        if self.fd is None or self.path is None:
            return
        os.fsync(self.fd)
        os.close(self.fd)
        os.replace(self.path, self.path.with_name(self.path.name.removesuffix(".partial")))
        self.fd, self.path, self.in_shard = None, None, 0
        self.num += 1


class RunStore:
    """The writing side of a run directory. Open, write records, close with a status."""

    def __init__(self, root: str | Path, *, writer: str = "", shard_records: int = 50_000):
        self.root = Path(root)
        self.writer = writer
        self.shard_records = shard_records
        self._ids: dict[str, set[str]] = {}
        self._writers: dict[str, _ShardWriter] = {}
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
                with open(path, "rb") as f:
                    for line in f:
                        if line.endswith(b"\n"):
                            ids.add(orjson.loads(line)["id"])
            self._ids[kind] = ids
            first = max(nums) + 1 if nums else 0
            self._writers[kind] = _ShardWriter(folder, self.writer, first, self.shard_records)
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
                if path.name.endswith(".partial"):
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
        atomic_write(self.root / "manifest.json", orjson.dumps(manifest, option=orjson.OPT_INDENT_2))
        return manifest


def read_manifest(root: str | Path) -> dict[str, Any] | None:
    path = Path(root) / "manifest.json"
    return orjson.loads(path.read_bytes()) if path.exists() else None


def _sha256(path: Path) -> str:
    """A shard's digest, read in chunks (shards can be larger than memory should hold)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
