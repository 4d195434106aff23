"""Benchmarks: ``fair bench NAME [--quick] [--json] [module options]``.

Each benchmark is a module with ``run(args) -> dict`` and, optionally, ``add_arguments(parser)``
(its own options) and ``table(result) -> str`` (its own table). The dispatcher imports only the
module it runs, prints the table to stderr and, with ``--json``, the result as one JSON object on
the last line of stdout.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from typing import Any

BENCHMARKS = {
    "throughput": "fairdistill.benchmarks.throughput",
    "pipeline": "fairdistill.benchmarks.pipeline",
    "train": "fairdistill.benchmarks.train",
    "serve": "fairdistill.benchmarks.serve",
    "replay-svamp": "fairdistill.benchmarks.replay_svamp",
    "batch": "fairdistill.benchmarks.batch",
    "scale": "fairdistill.benchmarks.scale",
    "rundir": "fairdistill.benchmarks.rundir",
    "keys": "fairdistill.benchmarks.keys",
}


def cli_main(args: argparse.Namespace) -> int:
    name = args.name
    if name not in BENCHMARKS:
        print(f"fair bench: unknown benchmark {name!r} (have {', '.join(BENCHMARKS)})", file=sys.stderr)
        return 2
    module = importlib.import_module(BENCHMARKS[name])
    parser = argparse.ArgumentParser(prog=f"fair bench {name}")
    parser.add_argument(
        "--json", action="store_true", help="print the result as JSON on the last stdout line"
    )
    parser.add_argument("--quick", action="store_true", help="a smaller, faster version")
    if hasattr(module, "add_arguments"):
        module.add_arguments(parser)
    try:
        opts = parser.parse_args(list(getattr(args, "rest", None) or []))
    except SystemExit as exc:  # argparse already printed the reason
        return 0 if exc.code == 0 else 2
    opts.json = bool(opts.json or getattr(args, "json", False))
    opts.quick = bool(opts.quick or getattr(args, "quick", False))
    opts.name = name

    started = time.perf_counter()
    result = module.run(opts)
    result.setdefault("benchmark", name)
    result.setdefault("quick", opts.quick)
    result.setdefault("wall_s", round(time.perf_counter() - started, 1))
    table = module.table(result) if hasattr(module, "table") else format_result(result)
    print(table, file=sys.stderr, flush=True)
    if opts.json:
        print(json.dumps(result, default=str), flush=True)
    return int(result.get("exit_code", 0))


def format_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """A plain aligned text table of ``rows`` (dicts), with the given or all columns."""
    if not rows:
        return "(no rows)"
    cols = columns or list(dict.fromkeys(k for row in rows for k in row))
    cells = [[_cell(row.get(c)) for c in cols] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
    line = "  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(out)


def format_result(result: dict[str, Any]) -> str:
    """A generic rendering: lists of dicts as tables, everything else as ``key: value``."""
    parts = []
    scalars = {k: v for k, v in result.items() if not _is_rows(v) and not isinstance(v, dict)}
    for key, value in result.items():
        if _is_rows(value):
            parts.append(f"{key}:\n{format_table(value)}")
        elif isinstance(value, dict):
            parts.append(f"{key}: " + ", ".join(f"{k}={_cell(v)}" for k, v in value.items()))
    parts.append("  ".join(f"{k}={_cell(v)}" for k, v in scalars.items()))
    return "\n\n".join(parts)


def _is_rows(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0:
            return "0"
        return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)
