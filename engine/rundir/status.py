"""`fair status RUN_DIR`: counts, cost and failures of a run, live or finished.

Every record line is checked first: a damaged run directory is one line naming ``file:line``
and ``fair repair RUN_DIR`` (exit 2), not a traceback or a silently short report."""

from __future__ import annotations

from pathlib import Path

from engine.errors import UsageError
from engine.fair.report import render_markdown, summarize
from engine.rundir.repair import first_damage
from engine.rundir.store import read_manifest


def cli_main(args) -> int:
    root = Path(args.run_dir)
    if not root.is_dir():
        raise UsageError(f"{root}: no such run directory")
    if not (root / "manifest.json").exists() and not any(root.glob("*/shard-*")):
        raise UsageError(f"{root}: not a run directory (no shards, no manifest.json)")
    read_manifest(root)  # DamagedRunError (exit 2, names the file and `fair repair`) if unreadable
    if (damage := first_damage(root)) is not None:
        raise damage
    s = summarize(root)
    print(render_markdown(s, title=f"fair status — {root}"))
    return 1 if s["failures"] else 0
