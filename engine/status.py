"""`fair status RUN_DIR`: counts, cost and failures of a run, live or finished."""

from __future__ import annotations

import sys
from pathlib import Path

from engine.report import render_markdown, summarize


def cli_main(args) -> int:
    root = Path(args.run_dir)
    if not root.is_dir():
        print(f"fair status: {root}: no such run directory", file=sys.stderr)
        return 2
    s = summarize(root)
    print(render_markdown(s, title=f"fair status — {root}"))
    return 1 if s["failures"] else 0
