"""``fair bench rundir``: a run directory at scale — resume index, ``fair status``, disk per record.

Arms (``--quick``: smaller, in brackets; ``--records N`` / ``--lines N`` override):

1. **synthetic**: N = 10M [50k] ``responses`` records written through the real ``RunStore``,
   once plain and once with ``compress="zstd"``. Per arm: write rate, disk bytes per record
   (shards + saved index), then each in a fresh child process: opening the store with its saved
   index (``index_load_s``), the same with the index deleted so every shard is read
   (``index_scan_s``), the index's bytes per id and the child's peak RSS, and ``fair status``.
2. **generate**: a real ``fair generate --compress zstd`` of 1M [5k] lines against ``fair sim``
   (0 ms echo) in its own process: the first run (time, peak RSS), the rerun of the finished run
   (time, peak RSS), a rerun after one line was added to the input (every line read again, the
   index says which exist), ``fair status`` on it, and its disk per record (records, trace,
   cache, index). Peak RSS is each child's own ``VmHWM``.

Targets (``verdicts``): index ≤ 16 bytes an id; rerun of the finished run ≤ 2 s and ``fair
status`` ≤ 2 s (both at 1M lines); ≤ 300 bytes a record on disk with zstd. Times scale
linearly in the records (every step is a pass over the shards or the input), so the 100M
figure is ~100x the 1M one; ``fair status`` reads no line of a sealed shard whose sha256 the
manifest (records) or its saved totals (trace, ``engine.rundir.tracesum``) give, so it costs
hashing the bytes on disk (~0.5 GB/s here). The JSON keys are stable.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TARGETS = {"index_bytes_per_id": 16, "rerun_s": 2.0, "status_s": 2.0, "disk_bytes_per_record_zstd": 300}
FAST_SIM = 'name = "bench-rundir"\ndefault_model = "echo"\n[models.echo]\ncontent = "echo"\nlatency_ms = 0\n'

# Peak RSS is the child's own VmHWM (``ru_maxrss`` would count the parent's pages copied at fork).
_HWM = "int(next(ln for ln in open('/proc/self/status') if ln.startswith('VmHWM')).split()[1]) / 1024"
_OPEN = f"""
import json, sys, time
from fairdistill.engine.rundir.store import RunStore
t = time.perf_counter()
store = RunStore(sys.argv[1]).open(["responses"])
took = time.perf_counter() - t
ids = store.ids("responses")
print(json.dumps({{"s": took, "n": len(ids), "index_bytes": ids.hashes.nbytes(), "peak_rss_mb": {_HWM}}}))
"""
_BASE = f"import json; import fairdistill.engine.rundir.store; print(json.dumps({{'peak_rss_mb': {_HWM}}}))"
_FAIR = f"""
import atexit, os, sys
atexit.register(lambda: open(os.environ["FAIR_BENCH_HWM"], "w").write(str({_HWM})))
from fairdistill.engine.cli import main
sys.exit(main(sys.argv[1:]))
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--records", type=int, default=None, help="synthetic records (default 10M; quick 50k)"
    )
    parser.add_argument("--lines", type=int, default=None, help="fair generate lines (default 1M; quick 5k)")
    parser.add_argument("--skip-generate", action="store_true", help="only the synthetic arm")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (printed)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    n = args.records or (50_000 if args.quick else 10_000_000)
    lines = args.lines or (5_000 if args.quick else 1_000_000)
    work = Path(tempfile.mkdtemp(prefix="fair-bench-rundir-"))
    result: dict[str, Any] = {"records": n, "lines": lines, "work": str(work)}
    try:
        result["synthetic"] = {c: _synthetic(work / f"syn-{c}", n, c) for c in ("none", "zstd")}
        if not args.skip_generate:
            result["generate"] = _generate_arm(work, lines)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    result["verdicts"] = _verdicts(result)
    result["exit_code"] = 0 if all(result["verdicts"].values()) else 1
    return result


def _synthetic(out: Path, n: int, compress: str) -> dict[str, Any]:
    """Write ``n`` responses through the real store, then measure opening it twice and status."""
    from fairdistill.engine.rundir.schema import Response
    from fairdistill.engine.rundir.store import RunStore

    t0 = time.perf_counter()
    store = RunStore(out, compress=compress).open(["responses"])
    for i in range(n):
        store.write(
            "responses",
            Response(id=f"req-{i:09d}", texts=[f"The answer to question {i} is {i * 7 % 1000}."],
                     finish_reasons=["stop"], prompt_tokens=20 + i % 50, completion_tokens=12 + i % 9),
        )  # fmt: skip
    store.close("done")
    write_s = time.perf_counter() - t0
    disk = _bytes(out)
    loaded = _child(_OPEN, str(out))
    shutil.move(out / "index", out.parent / f"{out.name}-index")
    scanned = _child(_OPEN, str(out))
    shutil.move(out.parent / f"{out.name}-index", out / "index")
    status_s, status_rc = _timed([sys.executable, "-m", "fairdistill", "status", str(out)])
    base = _child(_BASE)
    return {
        "write_s": round(write_s, 2),
        "write_records_per_s": round(n / write_s),
        "disk_bytes_per_record": round(disk / n, 1),
        "index_load_s": round(loaded["s"], 3),
        "index_scan_s": round(scanned["s"], 3),
        "index_bytes_per_id": round(loaded["index_bytes"] / max(1, loaded["n"]), 2),
        "open_peak_rss_mb": round(loaded["peak_rss_mb"], 1),
        "scan_peak_rss_mb": round(scanned["peak_rss_mb"], 1),
        "import_rss_mb": round(base["peak_rss_mb"], 1),
        "status_s": round(status_s, 3),
        "status_rc": status_rc,
        "ids_ok": loaded["n"] == n == scanned["n"],
    }


def _generate_arm(work: Path, lines: int) -> dict[str, Any]:
    from fairdistill.benchmarks.throughput import simulator

    inp = work / "in.jsonl"
    with open(inp, "w") as f:
        for i in range(lines):
            f.write(json.dumps({"id": f"req-{i:09d}", "prompt": f"Write one sentence about {i}."}) + "\n")
    out = work / "gen"
    with simulator(work, FAST_SIM) as url:
        cmd = [sys.executable, "-m", "fairdistill", "generate", "--endpoint", url, "--model", "echo",
               "--input", str(inp), "--output", str(out), "--no-progress", "--concurrency", "64",
               "--compress", "zstd"]  # fmt: skip
        first_s, first_rc, first_rss = _timed(cmd, rss=True)
        rerun_s, rerun_rc, rerun_rss = _timed(cmd, rss=True)
        with open(inp, "a") as f:  # the input changed: every line is read again, the index says what exists
            f.write(json.dumps({"id": "one-more", "prompt": "One more."}) + "\n")
        resume_s, resume_rc, resume_rss = _timed(cmd, rss=True)
    status_s, status_rc = _timed([sys.executable, "-m", "fairdistill", "status", str(out)])
    parts = {p.name: _bytes(p) if p.is_dir() else p.stat().st_size for p in out.iterdir()}
    return {
        "first_run_s": round(first_s, 2),
        "first_run_rc": first_rc,
        "first_run_peak_rss_mb": first_rss,
        "rerun_s": round(rerun_s, 3),
        "rerun_rc": rerun_rc,
        "rerun_peak_rss_mb": rerun_rss,
        "resume_one_new_line_s": round(resume_s, 3),
        "resume_one_new_line_rc": resume_rc,
        "resume_one_new_line_peak_rss_mb": resume_rss,
        "status_s": round(status_s, 3),
        "status_rc": status_rc,
        "disk_bytes_per_record": round(sum(parts.values()) / lines, 1),
        "disk_bytes_per_record_by_part": {k: round(v / lines, 1) for k, v in sorted(parts.items())},
    }


def _child(code: str, *argv: str) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def _timed(cmd: list[str], rss: bool = False) -> Any:
    """Wall seconds and exit code of ``fair ARGS`` (``cmd`` = [python, -m, engine.cli, ARGS...]),
    and its peak RSS in MB with ``rss``."""
    fd, name = tempfile.mkstemp(prefix="fair-bench-hwm-")
    os.close(fd)
    hwm = Path(name)
    env = {**os.environ, "FAIR_BENCH_HWM": name}
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _FAIR, *cmd[3:]], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)  # fmt: skip
    took = time.perf_counter() - t0
    if done.returncode not in (0, 1):
        print(f"fair bench rundir: {' '.join(cmd[3:6])}...: {done.stderr.decode()[-500:]}", file=sys.stderr)
    text = hwm.read_text()
    hwm.unlink(missing_ok=True)
    peak = round(float(text), 1) if text else None
    return (took, done.returncode, peak) if rss else (took, done.returncode)


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _verdicts(r: dict[str, Any]) -> dict[str, bool]:
    syn = r["synthetic"]
    v = {
        "index_bytes_per_id": all(
            a["index_bytes_per_id"] <= TARGETS["index_bytes_per_id"] for a in syn.values()
        ),
        "synthetic_ids_ok": all(a["ids_ok"] for a in syn.values()),
    }
    if "generate" in r:
        g = r["generate"]
        v["generate_ok"] = all(
            g[k] == 0 for k in ("first_run_rc", "rerun_rc", "resume_one_new_line_rc", "status_rc")
        )
        v["rerun_s"] = g["rerun_s"] <= TARGETS["rerun_s"]
        v["status_s"] = g["status_s"] <= TARGETS["status_s"]
        v["disk_bytes_per_record_zstd"] = g["disk_bytes_per_record"] <= TARGETS["disk_bytes_per_record_zstd"]
    return v


def table(r: dict[str, Any]) -> str:
    lines = [f"run directory at scale: {r['records']:,} synthetic records, {r['lines']:,} generate lines"]
    for c, a in r["synthetic"].items():
        lines.append(
            f"synthetic {c:>4}: write {a['write_records_per_s']:,} rec/s, "
            f"{a['disk_bytes_per_record']} B/record; "
            f"open {a['index_load_s']} s with the index, {a['index_scan_s']} s reading every shard; "
            f"index {a['index_bytes_per_id']} B/id (target <= 16), peak RSS {a['open_peak_rss_mb']} MB "
            f"(imports {a['import_rss_mb']} MB); fair status {a['status_s']} s"
        )
    if "generate" in r:
        g = r["generate"]
        lines.append(
            f"fair generate --compress zstd: first run {g['first_run_s']} s "
            f"({g['first_run_peak_rss_mb']} MB); "
            f"rerun of the finished run {g['rerun_s']} s ({g['rerun_peak_rss_mb']} MB, target <= 2 s); "
            f"one new input line: {g['resume_one_new_line_s']} s "
            f"({g['resume_one_new_line_peak_rss_mb']} MB); "
            f"fair status {g['status_s']} s (<= 2 s); {g['disk_bytes_per_record']} B/record (<= 300): "
            f"{g['disk_bytes_per_record_by_part']}"
        )
    lines.append(f"verdicts: {r['verdicts']}")
    return "\n".join(lines)
