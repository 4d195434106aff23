"""Resume without holding the run in memory: index what was written, read back what is needed.

A FAIR job that was interrupted left records (attempts, rationales, feedback, reviews) of
problems it had started but not finished. ``PriorRecords`` scans those kinds once, keeping for
each unfinished problem only *where* its records are (shard, byte offset); the records
themselves are read back when that problem runs again (``load``) and dropped when it is done
(``drop``). Memory holds the offsets of unfinished problems plus the records of the at most
``max_in_flight`` problems running, never every prior record.
"""

from __future__ import annotations

from collections.abc import Container, Iterable
from pathlib import Path

import msgspec

from fairdistill.engine.rundir.reader import lines_at, shard_lines
from fairdistill.engine.rundir.schema import KINDS, Record
from fairdistill.engine.rundir.store import shard_paths


class _Head(msgspec.Struct):
    """The two fields the index needs; msgspec skips the rest of the line unparsed."""

    id: str
    problem_id: str = ""


_head = msgspec.json.Decoder(_Head)


class PriorRecords:
    """Records of unfinished problems, by record id, read from disk one problem at a time."""

    def __init__(
        self,
        root: str | Path,
        kinds: Iterable[str],
        done: Container[str],
        scope: str | None = None,
    ):
        """``scope``: read only the shards of writers whose name starts with it (a Ray block's
        attempts, ``b00012.``), as ``RunStore(scope=...)`` indexes them."""
        self._paths: list[tuple[str, Path]] = []  # (kind, shard)
        self._where: dict[str, list[tuple[int, int]]] = {}  # problem id -> [(path index, offset)]
        self._loaded: dict[str, Record] = {}
        self._by_problem: dict[str, list[str]] = {}
        for kind in kinds:
            for path in shard_paths(Path(root), kind):
                if scope is not None and not path.name.startswith(f"shard-{scope}"):
                    continue
                index = len(self._paths)
                self._paths.append((kind, path))
                self._scan(Path(root), path, index, done)
        self._decoders = {kind: msgspec.json.Decoder(KINDS[kind]) for kind, _ in self._paths}

    def _scan(self, root: Path, path: Path, index: int, done: Container[str]) -> None:
        """Index one shard by the rules of ``engine.rundir.reader`` (``RunStore.open`` has judged
        every line already; a torn last line of a ``.partial`` shard is not a record)."""
        offset = 0
        for _, line in shard_lines(root, path):
            start, offset = offset, offset + len(line)
            try:
                head = _head.decode(line)
            except msgspec.DecodeError:
                continue  # an unreadable line cannot be reused; the problem is redone
            if head.problem_id and head.problem_id not in done:
                self._where.setdefault(head.problem_id, []).append((index, start))

    def __len__(self) -> int:
        """Unfinished problems with records on disk."""
        return len(self._where)

    def load(self, problem_id: str) -> int:
        """Read a problem's prior records into memory; returns how many."""
        spots = self._where.pop(problem_id, None)
        if not spots:
            return 0
        ids = self._by_problem.setdefault(problem_id, [])
        by_path: dict[int, list[int]] = {}
        for index, offset in spots:
            by_path.setdefault(index, []).append(offset)
        for index, offsets in by_path.items():
            kind, path = self._paths[index]
            decoder = self._decoders[kind]
            for line in lines_at(path, sorted(offsets)):  # a compressed shard is read forward
                try:
                    rec = decoder.decode(line)
                except msgspec.DecodeError:
                    continue
                self._loaded[rec.id] = rec
                ids.append(rec.id)
        return len(ids)

    def drop(self, problem_id: str) -> None:
        for rid in self._by_problem.pop(problem_id, ()):
            self._loaded.pop(rid, None)

    def get(self, record_id: str) -> Record | None:
        return self._loaded.get(record_id)
