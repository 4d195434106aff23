"""`fair bench pipeline`: the FAIR job against a rate-limited, realistically slow committee.

Two measurements in one run:

1. **Limit-bound wall time.** Three simulated teachers with lognormal latency (median 1 s) and
   per-endpoint RPM limits, a student, N problems. Whatever the engine does, an endpoint that
   must serve ``c`` calls at ``rpm`` needs at least ``60·c/rpm`` seconds; the busiest endpoint's
   figure is the lower bound on wall time. Target: wall time within 90 % of it
   (``bound / wall ≥ 0.9``). The same run gives teacher calls per mistake (paper: a fixed 12 =
   3 rationales + 3 explanations + 6 reviews); target ≤ 10 through gold check and early stop.
2. **Early stop is exact.** With gold check off, early-stopped review and exhaustive review must
   accept exactly the same rationales; the saving in review calls is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

from engine.config import RunConfig, convert_config
from engine.pipeline import Job
from engine.schema import Problem
from engine.sim import ModelProfile, SimProfile, start_sim
from engine.store import iter_records

# Skills are the gold-match rates of the paper's released SVAMP rationales (gpt 69 %, gemini 63 %,
# mistral 57 %, computed with engine.answers), so the gold check rejects as often as it would there.
TEACHERS = {
    "gpt-sim": {"skill": 0.69, "leniency": 0.4, "rpm": 900},
    "claude-sim": {"skill": 0.63, "leniency": -0.5, "rpm": 600},
    "gemini-sim": {"skill": 0.57, "leniency": 0.2, "rpm": 1200},
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--problems", type=int, default=None, help="problems (default 400, quick 150)")
    p.add_argument("--latency-ms", type=float, default=1000.0, help="median teacher latency")


def make_problems(n: int) -> list[Problem]:
    return [
        Problem(
            id=f"b{i:05d}",
            question=f"A shop has {i % 97 + 5} boxes with {i % 13 + 2} apples each and sells {i % 7 + 1} "
            f"boxes. How many apples are left? (#{i})",
            answer=str((i % 97 + 5 - (i % 7 + 1)) * (i % 13 + 2)),
            task="numeric",
            dataset="bench",
        )
        for i in range(n)
    ]


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
            limit_burst_s=1.0,  # a provider's bucket refills continuously; no minute-long burst
        )
        for name, t in TEACHERS.items()
    }
    models["student"] = ModelProfile(
        content="reasoning", role="student", skill=0.4, latency_ms=latency_ms / 4
    )
    return SimProfile(name="bench-pipeline", seed=1, models=models)


def job_config(base_url: str, *, rpm: bool, review: dict) -> RunConfig:
    endpoints = {
        name: {"base_url": base_url, "model": name, "rpm": t["rpm"] if rpm else None, "concurrency": 512}
        for name, t in TEACHERS.items()
    }
    endpoints["student"] = {"base_url": base_url, "model": "student", "concurrency": 512}
    raw = {
        "run": {"seed": 0, "max_in_flight": 1024},
        "student": {"endpoint": "student"},
        "teachers": {"endpoints": list(TEACHERS)},
        "review": review,
        "endpoints": {k: {kk: vv for kk, vv in v.items() if vv is not None} for k, v in endpoints.items()},
    }
    return convert_config(raw, RunConfig, source="bench")


async def _limit_bound(n: int, latency_ms: float, work: Path) -> dict:
    probs = make_problems(n)
    async with start_sim(sim_profile(latency_ms, limited=True), problems=probs) as sim:
        job = Job(job_config(sim.base_url, rpm=True, review={}), work / "limited", progress=False)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        summary = await job.run(probs)
        wall = loop.time() - t0
        by_model = {name: sim.stats.by_model[name]["ok"] for name in TEACHERS}
        sim_429 = sim.stats["http_429"]
    bounds = {name: 60.0 * by_model[name] / TEACHERS[name]["rpm"] for name in TEACHERS}
    busiest = max(bounds, key=bounds.get)
    counts = summary["counts"]
    teacher_calls = sum(by_model.values())
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


def run(args: argparse.Namespace) -> dict:
    n = args.problems or (150 if args.quick else 400)
    with tempfile.TemporaryDirectory(prefix="fair-bench-pipeline-") as tmp:
        limited = asyncio.run(_limit_bound(n, args.latency_ms, Path(tmp)))
        parity = asyncio.run(_early_stop_parity(n, Path(tmp)))
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
