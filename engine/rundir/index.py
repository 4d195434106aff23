"""The resume index: which record ids a run directory holds, in ~9 bytes an id.

``RunStore`` keeps the ids of each kind as a ``HashSet64`` of their 64-bit hashes
(``engine.rundir.idset``), not as strings (100-300 bytes each). When it closes with every shard
of a kind sealed, it writes that set beside the manifest::

    RUN_DIR/index/<kind>.ids    b"FAIRIDX1", 4-byte header length, JSON header, sorted uint64s

The header lists the shards the set was built from, each with its size and the sha256 the
manifest gives it (``sealed``): a resume whose manifest still lists those shards with those
digests, and whose files still have those sizes, loads the set (8 MB for 1M ids, ~20 ms) and reads
only shards added since; anything else (a shard rewritten by ``fair repair``, deleted, an index
from another manifest) and the index is ignored and the shards are read again. The index is
only a cache of what the shards say: deleting it is always safe.

A 64-bit hash can mistake a new id for one already written with probability ~n/2^64 per lookup
(5e-12 at 100M ids): that id's record would be missing, and ``fair status`` counts records, so
it would show. Confirming each hit on disk would cost a read per resumed id.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson

from fairdistill.engine.rundir.idset import HashSet64, id_hash

MAGIC = b"FAIRIDX1"
FOLDER = "index"


class StoredIds:
    """The ids of one kind: ``in`` and ``len`` from the hashes in memory; iterating reads the
    id strings back from the shards (``lines``), for the few callers that need them (digests)."""

    __slots__ = ("_hashes", "_lines")

    def __init__(self, hashes: HashSet64, lines: Callable[[], Iterable[str]]):
        self._hashes = hashes
        self._lines = lines

    def __contains__(self, record_id: object) -> bool:
        return isinstance(record_id, str) and id_hash(record_id) in self._hashes

    def add(self, record_id: str) -> bool:
        return self._hashes.add(id_hash(record_id))

    def discard(self, record_id: str) -> None:
        self._hashes.discard(id_hash(record_id))

    def __len__(self) -> int:
        return len(self._hashes)

    def __iter__(self) -> Iterator[str]:
        return iter(self._lines())

    @property
    def hashes(self) -> HashSet64:
        return self._hashes


def index_path(root: Path, kind: str) -> Path:
    return root / FOLDER / f"{kind}.ids"


def save(root: Path, kind: str, shards: list[dict[str, Any]], hashes: HashSet64) -> None:
    """Write the index of ``kind`` sealed with ``shards`` (the manifest's entries of that kind);
    a temporary file and a rename, so a reader sees the old index or the new one."""
    header = orjson.dumps({"kind": kind, "count": len(hashes), "shards": [
        [s["path"], s["bytes"], s["sha256"]] for s in shards]})  # fmt: skip
    path = index_path(root, kind)
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(MAGIC + struct.pack("<I", len(header)) + header)
        f.write(hashes.to_bytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(
    root: Path, kind: str, manifest: dict[str, Any] | None, on_disk: list[Path]
) -> tuple[HashSet64, set[str]]:
    """The saved set of ``kind`` and the shards (paths relative to ``root``) it covers, or an
    empty set covering nothing when there is no index or it does not fit the run directory."""
    empty: tuple[HashSet64, set[str]] = (HashSet64(), set())
    path = index_path(root, kind)
    if manifest is None or not path.exists():
        return empty
    try:
        with open(path, "rb") as f:
            if f.read(8) != MAGIC:
                return empty
            (n,) = struct.unpack("<I", f.read(4))
            header = orjson.loads(f.read(n))
            if not _fits(root, kind, header, manifest, on_disk):
                return empty
            if os.fstat(f.fileno()).st_size != 12 + n + 8 * header["count"]:
                return empty
            hashes = HashSet64.from_file(f, header["count"])
    except (OSError, EOFError, struct.error, orjson.JSONDecodeError):
        return empty
    return hashes, {rel for rel, _, _ in header["shards"]}


def _fits(root: Path, kind: str, header: Any, manifest: dict[str, Any], on_disk: list[Path]) -> bool:
    """The index was written with this manifest's digests, and its shards are unchanged in size."""
    if not isinstance(header, dict) or header.get("kind") != kind or not isinstance(header.get("count"), int):
        return False
    listed = {s.get("path"): s for s in manifest.get("shards") or [] if isinstance(s, dict)}
    present = {str(p.relative_to(root)) for p in on_disk}
    try:
        for rel, size, digest in header["shards"]:
            entry = listed.get(rel)
            if entry is None or entry.get("sha256") != digest or rel not in present:
                return False
            if (root / rel).stat().st_size != size:
                return False
    except (TypeError, ValueError, OSError):
        return False
    return True
