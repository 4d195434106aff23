"""`fair bench pipeline`: the FAIR job against a rate-limited, realistically slow committee.

Two measurements in one run:

1. **Limit-bound wall time.** Three simulated teachers with lognormal latency (median 1 s) and
   per-endpoint RPM limits (token buckets of 1 s), a student, N problems, far more than the
   job's ``max_in_flight`` (2,000 and 256; ``--quick``: 600 and 64), so the streaming window is
   exercised. Whatever the engine does, an endpoint that must serve ``c`` calls at ``rpm`` needs
   at least ``60·(c - burst)/rpm`` seconds, ``burst`` being what its bucket holds at the start
   (``rpm/60`` calls); the busiest endpoint's figure is the lower bound on wall time. Calls per
   endpoint are counted from the run's trace (HTTP calls the server counted: attempts of calls
   not answered from the cache). Target: ``bound / wall ≥ 0.9``. The same run gives teacher
   calls per mistake (paper: a fixed 12 = 3 rationales + 3 explanations + 6 reviews); target
   ≤ 10 through gold check and early stop.
``--memory``: instead, RSS of a FAIR job over 200k problems (``--problems``) streamed into it,
against the simulator in the parent (no latency, no limits, a student right 90 % of the time so
the run is mostly student calls), the job in a child process whose RSS the parent samples: the
growth per record (of every kind) between 10 % and the end, beyond the index of done ids the
store keeps, must stay under 200 B, response cache on; per problem is reported too.

2. **Early stop is exact.** With gold check off, early-stopped review and exhaustive review must
   accept exactly the same rationales; the saving in review calls is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import msgspec

from fairdistill.engine.config import RunConfig, convert_config
from fairdistill.engine.fair.pipeline import Job
from fairdistill.engine.request.trace import TraceEvent
from fairdistill.engine.rundir.schema import Problem
from fairdistill.engine.rundir.store import iter_records
from fairdistill.engine.sim import ModelProfile, SimProfile, start_sim

# Skills are the gold-match rates of the paper's released SVAMP rationales (gpt 69 %, gemini 63 %,
# mistral 57 %, computed with engine.fair.answers), so the gold check rejects as often as it would there.
TEACHERS = {
    "gpt-sim": {"skill": 0.69, "leniency": 0.4, "rpm": 900},
    "claude-sim": {"skill": 0.63, "leniency": -0.5, "rpm": 600},
    "gemini-sim": {"skill": 0.57, "leniency": 0.2, "rpm": 1200},
}


LIMIT_BURST_S = 1.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--problems", type=int, default=None, help="problems (default 2000, quick 600)")
    p.add_argument(
        "--max-in-flight", type=int, default=None, help="problems in flight (default 256, quick 64)"
    )
    p.add_argument(
        "--parity-problems", type=int, default=None, help="early-stop check (default 400, quick 150)"
    )
    p.add_argument("--latency-ms", type=float, default=1000.0, help="median teacher latency")
    p.add_argument("--memory", action="store_true", help="RSS of a FAIR job over --problems (default 200k)")


def make_problems(n: int) -> list[Problem]:
    return list(iter_problems(n))


def iter_problems(n: int):
    for i in range(n):
        yield Problem(
            id=f"b{i:05d}",
            question=f"A shop has {i % 97 + 5} boxes with {i % 13 + 2} apples each and sells {i % 7 + 1} "
            f"boxes. How many apples are left? (#{i})",
            answer=str((i % 97 + 5 - (i % 7 + 1)) * (i % 13 + 2)),
            task="numeric",
            dataset="bench",
        )


def sim_profile(latency_ms: float, limited: bool) -> SimProfile:
    sigma = 0.5 if latency_ms else 0.0
    models = {
        name: ModelProfile(
            content="reasoning",
            latency_ms=latency_ms,
            latency_sigma=sigma,
            skill=t["skill"],
            leniency=t["leniency"],
            rpm=t["rpm"] if limited else None,
            limit_burst_s=LIMIT_BURST_S,  # a provider's bucket refills continuously; no minute-long burst
        )
        for name, t in TEACHERS.items()
    }
    models["student"] = ModelProfile(
        content="reasoning", role="student", skill=0.4, latency_ms=latency_ms / 4
    )
    return SimProfile(name="bench-pipeline", seed=1, models=models)


def job_config(base_url: str, *, rpm: bool, review: dict, max_in_flight: int = 1024) -> RunConfig:
    endpoints = {
        name: {"base_url": base_url, "model": name, "rpm": t["rpm"] if rpm else None, "concurrency": 512}
        for name, t in TEACHERS.items()
    }
    endpoints["student"] = {"base_url": base_url, "model": "student", "concurrency": 512}
    raw = {
        "run": {"seed": 0, "max_in_flight": max_in_flight},
        "student": {"endpoint": "student"},
        "teachers": {"endpoints": list(TEACHERS)},
        "review": review,
        "endpoints": {k: {kk: vv for kk, vv in v.items() if vv is not None} for k, v in endpoints.items()},
    }
    return convert_config(raw, RunConfig, source="bench")


def trace_calls(run_dir: Path) -> tuple[Counter, Counter]:
    """Per endpoint, from the run's trace: logical calls not answered from the cache, and the
    HTTP calls they made that the server counted (their attempts; refused 429s are not)."""
    decoder = msgspec.json.Decoder(TraceEvent)
    calls: Counter = Counter()
    http: Counter = Counter()
    for shard in sorted((run_dir / "trace").glob("*.jsonl")):
        for line in shard.read_bytes().splitlines():
            if not line.strip():
                continue
            event = decoder.decode(line)
            if event.cache_hit:
                continue
            calls[event.endpoint] += 1
            http[event.endpoint] += event.attempts
    return calls, http


async def _limit_bound(n: int, latency_ms: float, max_in_flight: int, work: Path) -> dict:
    probs = make_problems(n)
    run_dir = work / "limited"
    async with start_sim(sim_profile(latency_ms, limited=True), problems=probs) as sim:
        cfg = job_config(sim.base_url, rpm=True, review={}, max_in_flight=max_in_flight)
        job = Job(cfg, run_dir, progress=False)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        summary = await job.run(probs)
        wall = loop.time() - t0
        sim_ok = {name: sim.stats.by_model[name]["ok"] for name in TEACHERS}
        sim_429 = sim.stats["http_429"]
    calls, http = trace_calls(run_dir)
    by_model = {name: http[name] for name in TEACHERS}
    bursts = {name: TEACHERS[name]["rpm"] / 60 * LIMIT_BURST_S for name in TEACHERS}
    bounds = {
        name: 60.0 * max(0.0, by_model[name] - bursts[name]) / TEACHERS[name]["rpm"] for name in TEACHERS
    }
    busiest = max(bounds, key=bounds.get)
    counts = summary["counts"]
    teacher_calls = sum(calls[name] for name in TEACHERS)
    accepted = counts.get("accepted", 0)
    judged = accepted + counts.get("rejected_gold", 0) + counts.get("rejected_review", 0)
    return {
        "problems": n,
        "mistakes": counts.get("mistakes", 0),
        "wall_s": round(wall, 1),
        "bound_s": round(bounds[busiest], 1),
        "busiest_endpoint": busiest,
        "efficiency": round(bounds[busiest] / wall, 3),
        "teacher_calls": teacher_calls,
        "calls_per_mistake": round(teacher_calls / max(1, counts.get("mistakes", 0)), 2),
        "acceptance_rate": round(accepted / judged, 3) if judged else None,
        "server_429": sim_429,
        "max_in_flight": max_in_flight,
        "calls_by_endpoint": dict(calls),
        "http_calls_by_endpoint": dict(http),
        "server_ok_by_endpoint": sim_ok,
        "burst_subtracted": {k: round(v, 1) for k, v in bursts.items()},
    }


async def _early_stop_parity(n: int, work: Path) -> dict:
    probs = make_problems(n)
    results = {}
    async with start_sim(sim_profile(0.0, limited=False), problems=probs) as sim:
        for mode, early in (("exhaustive", False), ("early_stop", True)):
            d = work / mode
            cfg = job_config(sim.base_url, rpm=False, review={"gold_check": "off", "early_stop": early})
            await Job(cfg, d, progress=False).run(probs)
            results[mode] = (
                {r.id for r in iter_records(d, "rationales") if r.accepted},
                sum(1 for _ in iter_records(d, "reviews")),
            )
    (acc_full, rev_full), (acc_early, rev_early) = results["exhaustive"], results["early_stop"]
    return {
        "same_accepted_set": acc_full == acc_early,
        "accepted": len(acc_full),
        "reviews_exhaustive": rev_full,
        "reviews_early_stop": rev_early,
        "reviews_saved": round(1 - rev_early / rev_full, 3) if rev_full else None,
    }


# -- memory ------------------------------------------------------------------------------------

MAX_BYTES_PER_RECORD = 200


def _memory_child(spec: dict) -> dict:
    """The job over ``spec["problems"]`` streamed problems, against the parent's simulator."""
    run_dir = Path(spec["run_dir"])
    cfg = job_config(spec["base_url"], rpm=False, review={}, max_in_flight=spec["max_in_flight"])
    n = spec["problems"]
    summary = asyncio.run(Job(cfg, run_dir, progress=False).run(iter_problems(n), total=n))
    return {"counts": summary.get("counts", {})}


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def run_memory(args: argparse.Namespace) -> dict:
    from fairdistill.benchmarks.throughput import _id_index_mb
    from fairdistill.engine.sim import SimThread

    n = args.problems or (20_000 if args.quick else 200_000)
    in_flight = args.max_in_flight or 256
    profile = sim_profile(0.0, limited=False)
    profile.models["student"] = msgspec.structs.replace(profile.models["student"], skill=0.9)
    samples: list[tuple[int, float]] = []
    with tempfile.TemporaryDirectory(prefix="fair-bench-pipeline-mem-") as tmp:
        print(f"bench pipeline --memory: a FAIR job over {n} problems...", file=sys.stderr, flush=True)
        with SimThread(profile, problems=make_problems(n)) as sim:
            spec = {"base_url": sim.base_url, "run_dir": str(Path(tmp) / "run"), "problems": n}
            spec["max_in_flight"] = in_flight
            proc = subprocess.Popen(
                [sys.executable, "-m", "fairdistill.benchmarks.pipeline", "--memory-child", json.dumps(spec)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            student = sim.stats.by_model["student"]
            while proc.poll() is None:
                with contextlib.suppress(OSError, ValueError):
                    samples.append((student["ok"], _rss_mb(proc.pid)))
                time.sleep(0.5)
            out, err = proc.communicate()
            if proc.returncode != 0:
                raise RuntimeError(f"bench pipeline --memory child failed:\n{err.decode()[-3000:]}")
            result = json.loads(out.decode().strip().splitlines()[-1])
            total_calls = max(1, student["ok"])
            records = sum(  # records of every kind (each one's id is in the store's resume index)
                sum(1 for line in f.open("rb") if line.strip())
                for f in (Path(tmp) / "run").glob("*/*.jsonl*")
                if f.parent.name not in ("trace", "failures")
            )
    # student calls -> problems done (one student answer per problem, retries aside)
    done = [(ok * n / total_calls, rss) for ok, rss in samples]
    start = next(((d, r) for d, r in done if d >= n / 10), None)
    end = next(((d, r) for d, r in reversed(done) if d < 0.999 * n), None)
    if start is None or end is None or end[0] < 0.8 * n:
        raise RuntimeError(f"bench pipeline --memory: too few RSS samples ({len(samples)})")
    (d0, rss0), (d1, rss1) = start, end
    per_problem_records = records / n  # records written per problem (all kinds)
    r0, r1 = d0 * per_problem_records, d1 * per_problem_records
    index_mb = _id_index_mb(int(r1)) - _id_index_mb(int(r0))
    per_problem = (rss1 - rss0 - index_mb) * 1024**2 / max(1.0, d1 - d0)
    per_record = (rss1 - rss0 - index_mb) * 1024**2 / max(1.0, r1 - r0)
    return {
        "memory": {
            "problems": n,
            "max_in_flight": in_flight,
            "rss_mb_at": {str(int(d0)): round(rss0, 1), str(int(d1)): round(rss1, 1)},
            "rss_growth_mb": round(rss1 - rss0, 1),
            "id_index_growth_mb": round(index_mb, 1),
            "records": records,
            "beyond_index_bytes_per_problem": round(per_problem),
            "beyond_index_bytes_per_record": round(per_record),
            "allowed_bytes_per_record": MAX_BYTES_PER_RECORD,
            "counts": result["counts"],
            "pass": per_record <= MAX_BYTES_PER_RECORD,
        },
        "exit_code": 0 if per_record <= MAX_BYTES_PER_RECORD else 1,
    }


def run(args: argparse.Namespace) -> dict:
    if getattr(args, "memory", False):
        return run_memory(args)
    n = args.problems or (600 if args.quick else 2000)
    in_flight = args.max_in_flight or (64 if args.quick else 256)
    n_parity = args.parity_problems or (150 if args.quick else 400)
    with tempfile.TemporaryDirectory(prefix="fair-bench-pipeline-") as tmp:
        limited = asyncio.run(_limit_bound(n, args.latency_ms, in_flight, Path(tmp)))
        parity = asyncio.run(_early_stop_parity(n_parity, Path(tmp)))
    ok = limited["efficiency"] >= 0.9 and limited["calls_per_mistake"] <= 10 and parity["same_accepted_set"]
    return {
        "limit_bound": limited,
        "early_stop": parity,
        "targets": {
            "efficiency>=0.9": limited["efficiency"] >= 0.9,
            "calls_per_mistake<=10": limited["calls_per_mistake"] <= 10,
            "early_stop_same_accepted_set": parity["same_accepted_set"],
        },
        "exit_code": 0 if ok else 1,
    }


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--memory-child":
        print(json.dumps(_memory_child(json.loads(sys.argv[2]))))
    else:
        sys.exit("usage: fair bench pipeline [--quick] [--json] [--problems N] [--memory]")
