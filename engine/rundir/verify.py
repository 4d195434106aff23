"""Whole-run-directory checks, shared by ``fair status``, every resume and ``fair repair``.

``check_run_dir`` is what every reader runs before it trusts a run directory: the manifest is
readable and not of a newer schema, and every shard that ``manifest.json`` or a done block's
manifest (``blocks/<block>.e<epoch>.json``) lists exists with the sha256 written there.
``first_damage`` adds the line-by-line rules of ``engine.rundir.reader``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fairdistill.engine.errors import DamagedRunError
from fairdistill.engine.rundir import tracesum
from fairdistill.engine.rundir.reader import (
    ZST,
    check_version,
    decode_line,
    read_json,
    record_decoder,
    sha256,
    shard_lines,
)
from fairdistill.engine.rundir.schema import KINDS
from fairdistill.engine.rundir.store import shard_paths

DONE = frozenset({"done", "done_with_failures"})  # block attempts a re-run skips


def check_run_dir(root: str | Path, digests: dict[str, str] | None = None) -> None:
    """Raise ``UsageError`` (newer schema) or ``DamagedRunError`` (a listed shard missing or
    changed since it was listed) naming the file; a directory with no manifest passes.
    ``digests``: sha256s already computed, by path relative to ``root`` (filled in)."""
    root = Path(root)
    manifest = read_json(root, root / "manifest.json")
    if manifest is not None:
        check_version(root, manifest)
    digests = {} if digests is None else digests
    for where, rel, want in listed_shards(root, manifest):
        path = root / rel
        if not path.exists():
            if (root / f"{rel}.partial").exists() and where.name == "manifest.json":
                continue  # still being written (a live run resealed nothing yet)
            raise DamagedRunError(str(where), f"it lists {rel}, which is missing", str(root))
        got = digests.get(rel) or digests.setdefault(rel, sha256(path))
        if got != want:
            _first_bad_line(root, path)  # an unreadable line is named before "changed"
            raise DamagedRunError(
                str(path),
                f"changed since {where.relative_to(root)} recorded it (sha256 differs: "
                "lines were removed, added or edited)",
                str(root),
            )


def listed_shards(root: Path, manifest: dict[str, Any] | None) -> Iterator[tuple[Path, str, str]]:
    """(manifest file, shard path relative to ``root``, sha256) for every shard the run's
    manifest and its done block manifests list."""
    sources = [(root / "manifest.json", manifest)] if manifest is not None else []
    blocks = root / "blocks"
    if blocks.is_dir():
        for path in sorted(blocks.glob("b*.e*.json")):
            block = read_json(root, path)
            if block is not None and block.get("status") in DONE:
                sources.append((path, block))
    for where, m in sources:
        entries = m.get("shards", [])
        if not isinstance(entries, list):
            raise DamagedRunError(str(where), "`shards` is not a list", str(root))
        for i, e in enumerate(entries):
            rel = e.get("path") if isinstance(e, dict) else None
            digest = e.get("sha256") if isinstance(e, dict) else None
            if not isinstance(rel, str) or not isinstance(digest, str):
                raise DamagedRunError(str(where), f"`shards[{i}]` has no `path` and `sha256`", str(root))
            if Path(rel).is_absolute() or ".." in Path(rel).parts:
                why = f"`shards[{i}].path` {rel!r} leaves the run directory"
                raise DamagedRunError(str(where), why, str(root))
            yield where, rel, digest


def _first_bad_line(root: Path, path: Path) -> None:
    """``DamagedRunError`` at the first unreadable line of ``path``; ``UsageError`` at a newer one."""
    decoder = record_decoder(path.parent.name)
    for n, line in shard_lines(root, path):
        decode_line(root, path, n, line, decoder)


def first_damage(run_dir: str | Path, digests: dict[str, str] | None = None) -> DamagedRunError | None:
    """The first unreadable line of a run directory's shards (records and trace, in folder
    order), else a listed shard missing or changed, as the error to raise; None when whole.

    A shard whose bytes have the sha256 every manifest listing it gives (or a trace shard with
    totals saved for those bytes, ``engine.rundir.tracesum``) is not read line by line: its
    lines were written from typed records and are the ones sealed. Every other shard (the
    ``.partial`` ones, those not listed, those changed) is. ``digests``: as ``check_run_dir``."""
    root = Path(run_dir)
    digests = {} if digests is None else digests
    try:
        manifest = read_json(root, root / "manifest.json")
        if manifest is not None:
            check_version(root, manifest)
        listed: dict[str, set[str]] = {}
        for _, rel, want in listed_shards(root, manifest):
            listed.setdefault(rel, set()).add(want)
        known = {*KINDS, "trace"}
        for kind in sorted(p.name for p in root.iterdir() if p.is_dir() and p.name in known):
            for path in shard_paths(root, kind):
                if not _proven(root, path, listed, digests):
                    _first_bad_line(root, path)
        check_run_dir(root, digests)
    except DamagedRunError as exc:
        return exc
    return None


def _proven(root: Path, path: Path, listed: dict[str, set[str]], digests: dict[str, str]) -> bool:
    """Whether ``path`` is byte for byte the shard its manifests sealed (or, in the trace, the
    shard its saved totals describe)."""
    if path.name.endswith(".partial"):
        return False
    if path.parent.name == "trace":
        return tracesum.saved(root, path, digests) is not None
    rel = str(path.relative_to(root))
    wants = listed.get(rel)
    if not wants or len(wants) > 1:
        return False
    if not path.name.endswith(ZST) and not _ends_a_line(path):
        return False  # a line torn before the seal (a short write on a full disk): read, to name it
    got = digests.get(rel) or digests.setdefault(rel, sha256(path))
    return got in wants


def _ends_a_line(path: Path) -> bool:
    """Whether a plain shard is empty or ends with a newline (one byte read)."""
    with open(path, "rb") as f:
        if f.seek(0, 2) == 0:
            return True
        f.seek(-1, 2)
        return f.read(1) == b"\n"
