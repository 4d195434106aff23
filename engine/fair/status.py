"""`fair status RUN_DIR`: counts, cost and failures of a run, live or finished (the method's report).

The run directory is checked first by the rules every resume uses (``engine.rundir.verify``):
a damaged one (an unreadable or torn line, a listed shard missing or changed since the manifest
recorded its sha256, a bad trace line) is one line naming the file and ``fair repair RUN_DIR``
(exit 2); a newer ``schema_version`` is refused naming both versions (exit 2). Never a
traceback or a silently short report."""

from __future__ import annotations

import argparse
from pathlib import Path

from fairdistill.engine.errors import UsageError
from fairdistill.engine.fair.report import render_markdown, summarize
from fairdistill.engine.rundir.store import read_manifest
from fairdistill.engine.rundir.verify import first_damage


def cli_main(args: argparse.Namespace) -> int:
    root = Path(args.run_dir)
    if not root.is_dir():
        raise UsageError(f"{root}: no such run directory")
    if not (root / "manifest.json").exists() and not any(root.glob("*/shard-*")):
        raise UsageError(f"{root}: not a run directory (no shards, no manifest.json)")
    read_manifest(root)  # unreadable: DamagedRunError; newer: UsageError naming both versions (exit 2)
    digests: dict[str, str] = {}  # each shard hashed once, for the damage check and the totals
    if (damage := first_damage(root, digests)) is not None:
        raise damage
    s = summarize(root, digests)
    print(render_markdown(s, title=f"fair status — {root}"))
    return 1 if s["failures"] else 0
