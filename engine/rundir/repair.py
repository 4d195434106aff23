"""``fair repair RUN_DIR``: make a damaged run directory readable and resumable again.

A shard line that cannot be read (not JSON, not UTF-8, not the record its folder holds, a torn
line left by a crash) stops every reader with ``file:line`` and a pointer here. Repair:

1. moves each unreadable line, byte for byte, to ``RUN_DIR/quarantine/<kind>/<shard>.lines``,
   with one JSON line per moved line (``file``, ``line``, ``why``) in ``quarantine/index.jsonl``;
2. rewrites the shard without those lines (a temporary file, fsync, rename: a crash mid-repair
   leaves the old shard or the new one, and re-running repair is safe);
3. for a FAIR run, marks the problems those lines belonged to as not done: their ``problems``
   record moves to ``quarantine/problems/`` too (why: "redo"), so that resuming redoes them. The
   problem is read from what is left of the line (``"problem_id"`` or the ``id`` prefix); a line
   too damaged to tell is reported, and its record stays missing;
4. recomputes ``manifest.json`` (counts, shards with their sha256), keeping the fields of the
   old manifest when it was readable.

Nothing is deleted: every moved line is in ``quarantine/``. Resuming the run (``fair run`` /
``fair generate`` with the same directory) makes the missing records again, from the response
cache where the calls were made before, so a repaired and resumed run ends with the records of
an uninterrupted one. Run it while nothing writes to the directory.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import orjson

from engine.errors import DamagedRunError, UsageError
from engine.rundir.schema import KINDS
from engine.rundir.store import RunStore, atomic_write, read_manifest, shard_paths

QUARANTINE = "quarantine"
_PROBLEM_ID = re.compile(rb'"problem_id"\s*:\s*"((?:[^"\\]|\\.)*)"')
_ID_PREFIX = re.compile(rb'^\s*\{\s*"id"\s*:\s*"([^"\\/]+)/')


def check_line(line: bytes, decoder: msgspec.json.Decoder | None) -> str | None:
    """Why a shard line is unreadable, or None when it is fine. ``decoder``: the folder's record
    type (None for folders such as ``trace`` that hold plain JSON objects)."""
    if not line.endswith(b"\n"):
        return "torn line (no newline at the end)"
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        return f"not JSON: {exc}"
    if not isinstance(value, dict):
        return "not a JSON object"
    if decoder is None:
        return None
    if not isinstance(value.get("id"), str):
        return "no string `id`"
    try:
        decoder.decode(line)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
        return f"not a valid record: {exc}"
    return None


def first_damage(run_dir: str | Path) -> DamagedRunError | None:
    """The first unreadable line of a run directory's record shards (what ``repair`` would
    quarantine), as the error to raise, or None. A torn last line of a ``.partial`` shard is
    not damage: the writer cuts it on resume."""
    root = Path(run_dir)
    for kind in sorted(p.name for p in root.iterdir() if p.is_dir() and p.name in KINDS):
        decoder = msgspec.json.Decoder(KINDS[kind])
        for path in shard_paths(root, kind):
            with open(path, "rb") as f:
                for n, line in enumerate(f, 1):
                    if not line.endswith(b"\n") and path.name.endswith(".partial"):
                        break
                    if (why := check_line(line, decoder)) is not None:
                        return DamagedRunError(f"{path}:{n}", f"unreadable line: {why[:120]}", str(root))
    return _missing_shard(root)


def _missing_shard(root: Path) -> DamagedRunError | None:
    """A shard the manifest lists that is gone (deleted, or moved by hand): its records are lost,
    and a resume would not redo them, so say so instead of reporting smaller counts."""
    manifest = read_manifest(root)
    shards = manifest.get("shards") if isinstance(manifest, dict) else None
    for entry in shards if isinstance(shards, list) else []:
        rel = entry.get("path") if isinstance(entry, dict) else None
        if not isinstance(rel, str) or Path(rel).is_absolute() or ".." in Path(rel).parts:
            continue
        if not (root / rel).exists() and not (root / f"{rel}.partial").exists():
            return DamagedRunError(
                str(root / "manifest.json"), f"it lists {rel}, which is missing", str(root)
            )
    return None


def repair(run_dir: str | Path) -> dict[str, Any]:
    """Quarantine unreadable lines and recompute the manifest; returns what was done."""
    root = Path(run_dir)
    if not root.is_dir():
        raise UsageError(f"{root}: no such run directory")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and shard_paths(root, p.name))
    if not folders and not (root / "manifest.json").exists():
        raise UsageError(f"{root}: not a run directory (no shards, no manifest.json)")
    moved: list[dict[str, Any]] = []
    for kind in folders:
        decoder = msgspec.json.Decoder(KINDS[kind]) if kind in KINDS else None
        for path in shard_paths(root, kind):
            moved += _repair_shard(root, kind, path, lambda line, d=decoder: check_line(line, d))
    redo: dict[str, str] = {}  # problem id -> why it must be redone
    unknown = 0
    for e in moved:
        if e["kind"] in ("problems", "responses", "trace") or e["kind"] not in KINDS:
            continue
        if (pid := e.pop("problem")) is None:
            unknown += 1
        else:
            redo.setdefault(pid, f"redo: its {e['kind']} record ({e['file']}:{e['line']}) was unreadable")
    if redo:
        for path in shard_paths(root, "problems"):
            moved += _repair_shard(root, "problems", path, lambda line: _redo(line, redo))
    old = _old_manifest(root)
    kinds = [k for k in (old.get("counts") or {}) if k in KINDS] or [k for k in folders if k in KINDS]
    store = RunStore(root).open(kinds)
    own = ("schema_version", "status", "counts", "shards", "updated")
    extra = {k: v for k, v in old.items() if k not in own}
    extra["repaired"] = {
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "quarantined_lines": len(moved) + int((extra.get("repaired") or {}).get("quarantined_lines", 0)),
    }
    manifest = store.write_manifest(str(old.get("status") or "interrupted"), extra)
    for e in moved:
        e.pop("problem", None)
    return {"run_dir": str(root), "quarantined": moved, "counts": manifest["counts"], "unknown": unknown}


def _redo(line: bytes, redo: dict[str, str]) -> str | None:
    """Why a (readable) ``problems`` record must go so its problem is redone, else None."""
    try:
        return redo.get(orjson.loads(line).get("id"))
    except (orjson.JSONDecodeError, AttributeError):
        return None


def _problem_of(line: bytes) -> str | None:
    """The problem a damaged line belonged to, from what is left of it, if that can be told."""
    m = _PROBLEM_ID.search(line) or _ID_PREFIX.search(line)
    if m is None:
        return None
    try:
        return orjson.loads(b'"' + m.group(1) + b'"')
    except orjson.JSONDecodeError:
        return None


def _repair_shard(root: Path, kind: str, path: Path, why_moved) -> list[dict[str, Any]]:
    """Move the lines of ``path`` for which ``why_moved(line)`` gives a reason to quarantine."""
    with open(path, "rb") as f:
        lines = list(f)  # split on b"\n" only, as the store reads them (line numbers agree)
    keep: list[bytes] = []
    bad: list[tuple[int, bytes, str]] = []
    for n, line in enumerate(lines, 1):
        why = why_moved(line)
        if why is None:
            keep.append(line)
        else:
            bad.append((n, line, why))
    if not bad:
        return []
    folder = root / QUARANTINE / kind
    folder.mkdir(parents=True, exist_ok=True)
    rel = str(path.relative_to(root))
    entries = [{"kind": kind, "file": rel, "line": n, "why": why[:200]} for n, _, why in bad]
    # quarantine first, then the shard: a crash in between duplicates a bad line, never loses one
    raw = b"".join(ln if ln.endswith(b"\n") else ln + b"\n" for _, ln, _ in bad)
    _append(folder / (path.name.removesuffix(".partial") + ".lines"), raw)
    _append(root / QUARANTINE / "index.jsonl", b"".join(orjson.dumps(e) + b"\n" for e in entries))
    atomic_write(path, b"".join(keep))
    for e, (_, line, _) in zip(entries, bad, strict=True):
        e["problem"] = _problem_of(line)
    return entries


def _append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _old_manifest(root: Path) -> dict[str, Any]:
    try:
        value = orjson.loads((root / "manifest.json").read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def cli_main(args: Any) -> int:
    """``fair repair RUN_DIR``: one line per quarantined line (the first 20), then a summary."""
    result = repair(args.run_dir)
    moved = result["quarantined"]
    for e in moved[:20]:
        print(f"fair repair: {e['file']}:{e['line']}: {e['why']}", file=sys.stderr)
    if len(moved) > 20:
        print(f"fair repair: ... and {len(moved) - 20} more", file=sys.stderr)
    where = f" (kept in {Path(args.run_dir) / QUARANTINE})" if moved else ""
    if result["unknown"]:
        print(
            f"fair repair: {result['unknown']} of them too damaged to tell their problem: "
            "their records stay missing after a resume",
            file=sys.stderr,
        )
    counts = ", ".join(f"{k} {v}" for k, v in result["counts"].items())
    print(
        f"fair repair: {len(moved)} lines quarantined{where}; manifest rewritten ({counts}); "
        "resume the run to redo what they held",
        file=sys.stderr,
    )
    return 0


__all__ = ["check_line", "first_damage", "repair"]
