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

import collections
import os
import re
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import orjson

from fairdistill.engine.errors import DamagedRunError, UsageError
from fairdistill.engine.rundir.reader import (
    check_line,
    open_shard,
    read_json,
    record_decoder,
    sha256,
    shard_lines,
)
from fairdistill.engine.rundir.schema import KINDS
from fairdistill.engine.rundir.store import RunStore, atomic_write, read_manifest, shard_paths
from fairdistill.engine.rundir.verify import DONE, first_damage, listed_shards

QUARANTINE = "quarantine"
_PROBLEM_ID = re.compile(rb'"problem_id"\s*:\s*"((?:[^"\\]|\\.)*)"')
_ID_PREFIX = re.compile(rb'^\s*\{\s*"id"\s*:\s*"([^"\\/]+)/')


def repair(run_dir: str | Path) -> dict[str, Any]:
    """Quarantine unreadable lines and recompute the manifest; returns what was done."""
    root = Path(run_dir)
    if not root.is_dir():
        raise UsageError(f"{root}: no such run directory")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and shard_paths(root, p.name))
    if not folders and not (root / "manifest.json").exists():
        raise UsageError(f"{root}: not a run directory (no shards, no manifest.json)")
    _set_aside_manifest(root)
    changed = changed_shards(root)
    moved: list[dict[str, Any]] = []
    for kind in folders:
        decoder = record_decoder(kind)
        for path in shard_paths(root, kind):
            moved += _repair_shard(root, kind, path, partial(check_line, decoder=decoder))
    redo, unknown = _redo_for(moved)
    for pid, why in short_problems(root).items():
        redo.setdefault(pid, why)
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
    reopened = reopen_blocks(root)
    for e in moved:
        e.pop("problem", None)
    return {
        "run_dir": str(root),
        "quarantined": moved,
        "counts": manifest["counts"],
        "unknown": unknown,
        "redo": sorted(redo),
        "blocks_reopened": reopened,
        "changed": changed,
    }


def changed_shards(root: Path) -> list[str]:
    """Shards the manifests list that are gone or differ from their recorded sha256."""
    out: dict[str, None] = {}
    for _, rel, want in listed_shards(root, read_manifest(root)):
        path = root / rel
        if not path.is_file() or sha256(path) != want:
            out[rel] = None
    return list(out)


def _set_aside_manifest(root: Path) -> None:
    """A newer schema is refused (exit 2), never rewritten as this version; an unreadable
    ``manifest.json`` moves to ``quarantine/`` (it is recomputed from the shards)."""
    try:
        read_manifest(root)
    except DamagedRunError:
        (root / QUARANTINE).mkdir(exist_ok=True)
        os.replace(root / "manifest.json", root / QUARANTINE / "manifest.json")


def _redo_for(moved: list[dict[str, Any]]) -> tuple[dict[str, str], int]:
    """Problems whose quarantined records must be made again, and how many lines had no problem."""
    redo: dict[str, str] = {}  # problem id -> why it must be redone
    unknown = 0
    for e in moved:
        if e["kind"] in ("problems", "responses", "trace") or e["kind"] not in KINDS:
            continue
        if (pid := e.pop("problem")) is None:
            unknown += 1
        else:
            redo.setdefault(pid, f"redo: its {e['kind']} record ({e['file']}:{e['line']}) was unreadable")
    return redo, unknown


_COUNTED = {"attempts": "attempts", "rationales": "rationales", "feedback": "feedback", "samples": "samples"}


def short_problems(root: Path) -> dict[str, str]:
    """FAIR runs: problems whose completion marker counts more records than the shards hold (a
    line deleted, a shard emptied): their marker must go so a resume makes the missing records
    (adopting the rest; the calls come from the response cache)."""
    if not shard_paths(root, "problems"):
        return {}
    have: collections.Counter[tuple[str, str]] = collections.Counter()
    for kind in _COUNTED:
        for path in shard_paths(root, kind):
            for _, line in shard_lines(root, path):
                pid = orjson.loads(line).get("problem_id")
                have[kind, pid] += 1
    short: dict[str, str] = {}
    for path in shard_paths(root, "problems"):
        for _, line in shard_lines(root, path):
            done = orjson.loads(line)
            for kind, field in _COUNTED.items():
                want = done.get(field) or 0
                if isinstance(want, int) and have[kind, done["id"]] < want:
                    short[done["id"]] = (
                        f"redo: {have[kind, done['id']]} of its {want} {kind} records are left"
                    )
                    break
    return short


def reopen_blocks(root: Path) -> list[str]:
    """Ray runs: a done block attempt whose shards changed (repaired, emptied, deleted) is marked
    ``repaired`` with the shards as they are now, so the next run redoes the block (adopting its
    records) instead of skipping it. Returns the attempt manifests rewritten."""
    out = []
    for path in sorted((root / "blocks").glob("b*.e*.json")):
        block = read_json(root, path)
        if block is None or block.get("status") not in DONE:
            continue
        entries = [e for e in block.get("shards") or [] if isinstance(e, dict)]
        current = [
            {**e, "sha256": sha256(root / e["path"]), "bytes": (root / e["path"]).stat().st_size}
            for e in entries
            if isinstance(e.get("path"), str) and (root / e["path"]).is_file()
        ]
        if current != entries:
            block.update(status="repaired", shards=current)
            atomic_write(path, orjson.dumps(block, option=orjson.OPT_INDENT_2))
            out.append(path.name)
    return out


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


def _repair_shard(
    root: Path, kind: str, path: Path, why_moved: Callable[[bytes], str | None]
) -> list[dict[str, Any]]:
    """Move the lines of ``path`` for which ``why_moved(line)`` gives a reason to quarantine."""
    with open_shard(path) as f:
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
    for rel in result["changed"][:20]:
        print(f"fair repair: {rel}: changed since it was recorded; kept as it is now", file=sys.stderr)
    if result["redo"]:
        print(f"fair repair: {len(result['redo'])} problems will be redone on resume", file=sys.stderr)
    for name in result["blocks_reopened"]:
        print(
            f"fair repair: blocks/{name}: its shards changed; the block is redone on resume", file=sys.stderr
        )
    counts = ", ".join(f"{k} {v}" for k, v in result["counts"].items())
    print(
        f"fair repair: {len(moved)} lines quarantined{where}; manifest rewritten ({counts}); "
        "resume the run to redo what they held",
        file=sys.stderr,
    )
    return 0


__all__ = ["check_line", "first_damage", "repair"]
