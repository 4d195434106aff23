"""``fair bench batch``: the provider Batch API executor against online calls, on the simulator.

Arms (the simulator in its own process, each ``fair generate`` in a child whose CPU time and
peak RSS come from ``os.wait4``):

- **cost**: the same input online and in batch mode, OpenAI, Anthropic and Gemini wires: records equal,
  cost ratio batch/online (target <= 0.51).
- **cpu/rss**: N lines (50k; 5k with ``--quick``) online at concurrency 256 vs one batch of N:
  client CPU per record (target batch <= 0.5x online) and peak RSS with N requests waiting in a
  batch (target <= 1.2x online).
- **kills**: SIGKILL after the batch was submitted, then a rerun: items billed / unique requests
  (target 1.000) and batches created (1).
- **fair rounds**: the FAIR job with its teachers in batch mode, early stop on and off: batch
  turnarounds per problem (sequential teacher rounds on a problem's critical path: the rationale,
  then its reviewers one after another) and batches created.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

from fairdistill.benchmarks import format_table

PORT = 19650


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lines", type=int, default=None, help="lines for the cpu/rss arm (default 50000)")
    p.add_argument("--port", type=int, default=PORT)


def _get(url: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


class _Sim:
    def __init__(self, port: int, profile: str):
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fairdistill", "sim", "--port", str(port), "--profile", profile],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(300):
            try:
                _get(self.url + "/health")
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("the simulator did not start")

    def stats(self) -> dict:
        return _get(self.url + "/stats")

    def reset(self, faults: dict | None = None) -> None:
        _get(self.url + "/reset", {})
        _get(self.url + "/sim/batch-faults", faults or {})

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=10)


def _input(path: Path, n: int) -> Path:
    with open(path, "wb") as f:
        for i in range(n):
            f.write(
                json.dumps({"id": f"r{i}", "prompt": f"question number {i} about apples"}).encode() + b"\n"
            )
    return path


def _generate(sim: _Sim, provider: str, inp: Path, out: Path, *extra: str, kill_when=None) -> dict[str, Any]:
    """One ``fair generate`` child: its exit code, CPU seconds and peak RSS (MiB)."""
    args = [
        sys.executable,
        "-m",
        "fairdistill",
        "generate",
        "--endpoint",
        sim.url + ("/v1beta" if provider == "gemini" else "/v1"),
        "--model",
        "echo",
        "--provider",
        provider,
        "--input",
        str(inp),
        "--output",
        str(out),
        "--no-progress",
        "--max-tokens",
        "64",
        "--price-in",
        "1",
        "--price-out",
        "2",
        *extra,
    ]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if kill_when is not None:
        while proc.poll() is None and not kill_when():
            time.sleep(0.01)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode() if proc.stderr else ""
    return {
        "rc": proc.returncode,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "rss_mib": usage.ru_maxrss / 1024,
        "err": err[-500:],
    }


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def _texts(out: Path) -> dict[str, list[str]]:
    from fairdistill.engine.rundir.store import iter_raw

    return {r["id"]: r["texts"] for r in iter_raw(out, "responses")}


BATCH = ["--mode", "batch", "--batch-linger", "0.2", "--batch-poll", "0.1"]


WIRES = ("openai", "anthropic", "gemini")


def run(opts: argparse.Namespace) -> dict[str, Any]:
    n = opts.lines or (5_000 if opts.quick else 50_000)
    tmp = Path(tempfile.mkdtemp(prefix="fair-bench-batch-"))
    sim = _Sim(opts.port, "fast")
    result: dict[str, Any] = {"lines": n}
    try:
        # cost, every wire
        inp = _input(tmp / "cost.jsonl", 500)
        cost_rows = []
        for provider in WIRES:
            sim.reset()
            on = _generate(sim, provider, inp, tmp / f"on-{provider}", "--concurrency", "64")
            b = _generate(sim, provider, inp, tmp / f"b-{provider}", *BATCH)
            c_on = _manifest(tmp / f"on-{provider}")["generate"]["cost_usd"]
            c_b = _manifest(tmp / f"b-{provider}")["generate"]["cost_usd"]
            cost_rows.append(
                {
                    "wire": provider,
                    "records_equal": _texts(tmp / f"on-{provider}") == _texts(tmp / f"b-{provider}"),
                    "usd_online": c_on,
                    "usd_batch": c_b,
                    "cost_ratio": round(c_b / c_on, 4) if c_on else None,
                    "rc": (on["rc"], b["rc"]),
                }
            )
        result["cost"] = cost_rows
        result["cost_ratio"] = max(r["cost_ratio"] or 1 for r in cost_rows)

        # client CPU and RSS: N lines online vs N requests waiting in one batch
        inp = _input(tmp / "big.jsonl", n)
        sim.reset()
        on = _generate(sim, "openai", inp, tmp / "big-on", "--concurrency", "256", "--no-cache")
        sim.reset({"start_s": 2.0})
        b = _generate(
            sim,
            "openai",
            inp,
            tmp / "big-b",
            *BATCH,
            "--no-cache",
            "--batch-max-items",
            str(min(n, 50_000)),
            "--batch-max-open",
            "1",
            "--batch-linger",
            "1.0",
        )
        billed = sim.stats().get("batch_items_billed", 0)
        result["cpu_rss"] = [
            {
                "arm": "online c=256",
                "rc": on["rc"],
                "cpu_us_per_record": round(on["cpu_s"] / n * 1e6, 1),
                "rss_mib": round(on["rss_mib"], 1),
            },
            {
                "arm": f"batch ({n} waiting)",
                "rc": b["rc"],
                "cpu_us_per_record": round(b["cpu_s"] / n * 1e6, 1),
                "rss_mib": round(b["rss_mib"], 1),
            },
        ]
        result["cpu_ratio"] = round(b["cpu_s"] / on["cpu_s"], 3) if on["cpu_s"] else None
        result["rss_ratio"] = round(b["rss_mib"] / on["rss_mib"], 3) if on["rss_mib"] else None
        # what a waiting line costs beyond an online one (the slot, its record's token...)
        result["rss_over_online_bytes_per_line"] = round((b["rss_mib"] - on["rss_mib"]) * 2**20 / n)
        result["big_batch_billed"] = billed

        # kills: SIGKILL after submit, then a rerun
        inp = _input(tmp / "kill.jsonl", 2_000)
        kills = []
        for provider in WIRES:
            sim.reset({"start_s": 1.5})
            out = tmp / f"kill-{provider}"
            first = _generate(
                sim, provider, inp, out, *BATCH, kill_when=lambda: sim.stats().get("batches_created", 0) >= 1
            )
            # the counters run on across the rerun: billed counts both processes
            again = _generate(sim, provider, inp, out, *BATCH)
            st = sim.stats()
            kills.append(
                {
                    "wire": provider,
                    "killed_rc": first["rc"],
                    "rerun_rc": again["rc"],
                    "batches_created": st.get("batches_created", 0),
                    "items_billed": st.get("batch_items_billed", 0),
                    "unique": 2_000,
                    "billed_per_unique": round(st.get("batch_items_billed", 0) / 2_000, 3),
                }
            )
        result["kills"] = kills
        result["billed_per_unique"] = max(k["billed_per_unique"] for k in kills)
    finally:
        sim.stop()
    result["fair_rounds"] = asyncio.run(_fair_rounds(tmp))
    shutil.rmtree(tmp, ignore_errors=True)
    result["targets"] = {
        "cost_ratio<=0.51": result["cost_ratio"] <= 0.51,
        "cpu_ratio<=0.5": (result["cpu_ratio"] or 9) <= 0.5,
        "rss_ratio<=1.2": (result["rss_ratio"] or 9) <= 1.2,
        "billed_per_unique==1": result["billed_per_unique"] == 1.0,
    }
    result["exit_code"] = 0 if all(result["targets"].values()) else 1
    return result


async def _fair_rounds(tmp: Path) -> list[dict[str, Any]]:
    """The FAIR job on the built-in problems, teachers in batch mode, early stop on and off."""
    from fairdistill.engine.config import RunConfig, convert_config
    from fairdistill.engine.fair.pipeline import Job
    from fairdistill.engine.rundir.store import iter_raw
    from fairdistill.engine.sim import ModelProfile, SimProfile, start_sim
    from fairdistill.engine.sim.server import load_problems

    probs = load_problems("builtin")
    teachers = {"t-a": ("openai", 0.9, 0.3), "t-b": ("anthropic", 0.7, 0.0), "t-c": ("gemini", 0.8, -0.8)}
    models = {
        k: ModelProfile(content="reasoning", skill=s, leniency=le) for k, (_, s, le) in teachers.items()
    }
    models["student"] = ModelProfile(content="reasoning", role="student", skill=0.4)
    rows = []
    async with start_sim(SimProfile(name="bench", seed=7, models=models), problems=probs) as sim:
        for early in (True, False):
            eps = {
                k: {
                    "base_url": sim.base_url.removesuffix("/v1") + "/v1beta"
                    if p == "gemini"
                    else sim.base_url,
                    "model": k,
                    "provider": p,
                    "mode": "batch",
                    "price_in": 1.0,
                    "price_out": 2.0,
                    "batch": {"linger_s": 0.05, "poll_s": 0.05},
                }
                for k, (p, _, _) in teachers.items()
            }
            eps["student"] = {"base_url": sim.base_url, "model": "student"}
            raw = {
                "run": {"seed": 3},
                "student": {"endpoint": "student", "attempts": 2, "temperature": 0.7},
                "teachers": {"endpoints": list(teachers)},
                "endpoints": eps,
                "review": {"early_stop": early},
            }
            cfg = convert_config(raw, RunConfig, source="bench")
            sim.stats.reset()
            run_dir = tmp / f"fair-{early}"
            t0 = time.monotonic()
            await Job(cfg, run_dir, progress=False).run(probs)
            wall = time.monotonic() - t0
            per_target = Counter(r["target_id"] for r in iter_raw(run_dir, "reviews"))
            rounds: dict[str, int] = {}
            for r in iter_raw(run_dir, "rationales"):
                rounds[r["problem_id"]] = max(rounds.get(r["problem_id"], 0), 1 + per_target[r["id"]])
            with_mistakes = len(rounds) or 1
            rows.append(
                {
                    "early_stop": early,
                    "problems_with_mistakes": len(rounds),
                    "rounds_per_problem": round(sum(rounds.values()) / with_mistakes, 2),
                    "max_rounds": max(rounds.values(), default=0),
                    "reviews": sum(per_target.values()),
                    "batches": sim.stats["batches_created"],
                    "wall_s": round(wall, 1),
                }
            )
    return rows


def table(result: dict[str, Any]) -> str:
    parts = [
        f"fair bench batch ({result['lines']} lines in the cpu/rss arm)",
        "cost:\n" + format_table(result["cost"]),
        "cpu/rss:\n" + format_table(result["cpu_rss"]),
        f"cpu ratio batch/online {result['cpu_ratio']}, rss ratio {result['rss_ratio']} "
        f"({result['rss_over_online_bytes_per_line']} B a waiting line beyond online)",
        "kills (SIGKILL after submit, then rerun):\n" + format_table(result["kills"]),
        "FAIR, teachers in batch mode:\n" + format_table(result["fair_rounds"]),
        "targets: " + ", ".join(f"{k} {'ok' if v else 'MISSED'}" for k, v in result["targets"].items()),
    ]
    return "\n\n".join(parts)
