"""The FAIR job end to end over loopback HTTP against the simulator."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import msgspec
import pytest

from fairdistill.engine.config import RunConfig, convert_config
from fairdistill.engine.errors import BreakerTripped
from fairdistill.engine.fair.pipeline import Job, JobParts
from fairdistill.engine.fair.report import summarize
from fairdistill.engine.rundir.schema import Attempt, Problem
from fairdistill.engine.rundir.store import iter_records, read_manifest
from fairdistill.engine.sim import ModelProfile, SimProfile, start_sim

TEACHERS = {
    "t-good": ModelProfile(content="reasoning", skill=0.9, leniency=0.3),
    "t-mid": ModelProfile(content="reasoning", skill=0.7, leniency=0.0),
    "t-harsh": ModelProfile(content="reasoning", skill=0.8, leniency=-0.8),
}


def problems(n: int = 40) -> list[Problem]:
    return [
        Problem(
            id=f"p{i:03d}",
            question=f"Ann has {i + 3} pens and buys {2 * i + 1} more. How many pens?",
            answer=str(3 * i + 4),
            task="numeric",
            dataset="synthetic",
        )
        for i in range(n)
    ]


def profile(latency_ms: float = 0.0, student_skill: float = 0.4) -> SimProfile:
    models = {name: msgspec.structs.replace(m, latency_ms=latency_ms) for name, m in TEACHERS.items()}
    models["student"] = ModelProfile(
        content="reasoning", role="student", skill=student_skill, latency_ms=latency_ms
    )
    return SimProfile(name="test", seed=7, models=models)


def config(base_url: str, **sections) -> RunConfig:
    raw = {
        "run": {"seed": 3, "max_in_flight": 16},
        "student": {"endpoint": "student", "attempts": 2, "temperature": 0.7},
        "teachers": {"endpoints": list(TEACHERS)},
        "endpoints": {
            name: {
                "base_url": base_url,
                "model": name,
                "price_in": 1.0,
                "price_out": 2.0,
                "max_attempts": 2,
                "timeout_s": 10,
            }
            for name in [*TEACHERS, "student"]
        },
    }
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    return convert_config(raw, RunConfig, source="test")


async def run(cfg: RunConfig, run_dir: Path, probs: list[Problem]) -> dict:
    return await Job(cfg, run_dir, progress=False).run(probs)


async def test_end_to_end_records_and_samples(tmp_path):
    probs = problems()
    async with start_sim(profile(), problems=probs) as sim:
        summary = await run(config(sim.base_url), tmp_path, probs)
    assert summary["status"] == "done"
    done = {r.id: r for r in iter_records(tmp_path, "problems")}
    assert set(done) == {p.id for p in probs}

    attempts = list(iter_records(tmp_path, "attempts"))
    assert len(attempts) == 2 * len(probs)
    wrong = [a for a in attempts if not a.correct]
    assert 0.3 < len(wrong) / len(attempts) < 0.9  # the student's configured error rate (0.6)

    rationales = list(iter_records(tmp_path, "rationales"))
    for r in rationales:
        assert r.status in {"accepted", "rejected_gold", "rejected_review", "no_reviews"}
        if r.status == "rejected_gold":
            assert r.gold_match is False and r.scores == []  # default policy: never reviewed
        if r.accepted:
            assert r.gold_match and r.mean_score > 3
            assert all(s.reviewer != r.teacher for s in r.scores)
    reviews = list(iter_records(tmp_path, "reviews"))
    assert reviews and all(rv.reviewer != rv.author for rv in reviews)

    # paper policy: one accepted rationale per problem that has one, one explanation per mistake
    samples = list(iter_records(tmp_path, "samples"))
    by_problem: dict[str, list] = {}
    for s in samples:
        by_problem.setdefault(s.problem_id, []).append(s)
        assert s.messages[-1].role == "user" and s.response
    for pid, rec in done.items():
        got = by_problem.get(pid, [])
        assert sum(s.task == "rationale" for s in got) == min(rec.accepted, 1)
        assert sum(s.task == "mistake" for s in got) == rec.mistakes

    manifest = read_manifest(tmp_path)
    assert manifest["status"] == "done" and manifest["counts"]["samples"] == len(samples)
    report = (tmp_path / "report.md").read_text()
    assert "Acceptance by teacher" in report and "t-harsh" in report


async def test_report_figures_match_the_live_counts_and_the_server(tmp_path):
    """report.md is rebuilt from the run directory; its figures must be the ones the live run
    counted and the server saw: mistakes, API calls, and 429s (a tight rpm forces some)."""
    probs = problems(30)
    prof = profile()
    prof.models["t-mid"] = msgspec.structs.replace(prof.models["t-mid"], rpm=600, limit_burst_s=0.1)
    async with start_sim(prof, problems=probs) as sim:
        summary = await run(config(sim.base_url), tmp_path, probs)
        served = sum(m["requests"] for m in sim.stats.by_model.values())
        sim_429 = sim.stats["http_429"]
    got = summarize(tmp_path)
    assert sim_429 > 0
    assert got["http_429"] == sim_429
    assert got["calls"] == served - sim_429  # calls that went through; their 429s counted apart
    assert got["mistakes"] == summary["counts"]["mistakes"]
    assert f"| HTTP 429 / retries | {sim_429} / " in (tmp_path / "report.md").read_text()


async def test_early_stop_saves_reviews_and_keeps_the_accepted_set(tmp_path):
    probs = problems(30)
    async with start_sim(profile(), problems=probs) as sim:
        await run(
            config(sim.base_url, review={"gold_check": "off", "early_stop": False}), tmp_path / "full", probs
        )
        await run(
            config(sim.base_url, review={"gold_check": "off", "early_stop": True}), tmp_path / "early", probs
        )

    def verdicts(d: Path) -> dict[str, bool]:
        return {r.id: r.accepted for r in iter_records(d, "rationales")}

    assert verdicts(tmp_path / "full") == verdicts(tmp_path / "early")
    n_full = sum(1 for _ in iter_records(tmp_path / "full", "reviews"))
    n_early = sum(1 for _ in iter_records(tmp_path / "early", "reviews"))
    assert n_early < n_full


async def test_breaker_aborts_when_the_student_is_unreachable(tmp_path):
    cfg = config("http://127.0.0.1:9/v1", run={"breaker_window": 10, "breaker_rate": 0.5, "max_in_flight": 4})
    with pytest.raises(BreakerTripped, match="problems failed"):
        await run(cfg, tmp_path, problems(40))
    failures = list(iter_records(tmp_path, "failures"))
    assert failures and all(f.stage == "student" for f in failures)
    assert read_manifest(tmp_path)["status"] == "aborted"


CONFIG_TOML = """
[run]
seed = 3
max_in_flight = 8
[dataset]
name = "jsonl"
path = "{data}"
task = "numeric"
[student]
endpoint = "student"
attempts = 2
temperature = 0.7
[teachers]
endpoints = ["t-good", "t-mid", "t-harsh"]
{endpoints}
"""


def _write_job(tmp_path: Path, base_url: str, probs: list[Problem]) -> Path:
    data = tmp_path / "problems.jsonl"
    data.write_bytes(
        b"".join(
            msgspec.json.encode({"id": p.id, "question": p.question, "answer": p.answer}) + b"\n"
            for p in probs
        )
    )
    eps = "".join(
        f'[endpoints.{n}]\nbase_url = "{base_url}"\nmodel = "{n}"\n' for n in [*TEACHERS, "student"]
    )
    job = tmp_path / "job.toml"
    job.write_text(CONFIG_TOML.format(data=data, endpoints=eps))
    return job


async def _fair(*args: str, kill_after: float | None = None) -> int:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fairdistill",
        *args,
        stderr=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    if kill_after is not None:
        try:
            await asyncio.wait_for(proc.wait(), kill_after)
        except TimeoutError:
            proc.send_signal(signal.SIGKILL)
    await proc.communicate()
    return proc.returncode


def _sample_set(run_dir: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for s in iter_records(run_dir, "samples"):
        assert s.id not in out, f"duplicate sample {s.id}"
        out[s.id] = s.response
    return out


@pytest.mark.parametrize("kill_points", [(1.5,), (1.0, 2.0, 3.0)])
async def test_sigkill_then_resume_gives_the_uninterrupted_samples(tmp_path, kill_points):
    probs = problems(120)
    async with start_sim(profile(latency_ms=60), problems=probs) as sim:
        job = _write_job(tmp_path, sim.base_url, probs)
        assert await _fair("run", str(job), "--run-dir", str(tmp_path / "ref"), "--no-progress") == 0
        paid_ref = sim.stats["requests"]

        killed = tmp_path / "killed"
        kills = 0
        for t in kill_points:
            rc = await _fair("run", str(job), "--run-dir", str(killed), "--no-progress", kill_after=t)
            kills += rc == -signal.SIGKILL
        assert kills >= 1, "the run finished before any kill: make it longer"
        assert await _fair("run", str(job), "--run-dir", str(killed), "--no-progress") == 0
        paid_killed = sim.stats["requests"] - paid_ref

    assert _sample_set(killed) == _sample_set(tmp_path / "ref")
    assert {r.id for r in iter_records(killed, "problems")} == {p.id for p in probs}
    # only requests in flight at a kill may be paid twice (at most max_in_flight problems' worth)
    assert paid_killed <= paid_ref + kills * 8 * 12


# -- streaming input, resume index, seams ------------------------------------------------------


async def test_problems_stream_in_with_at_most_max_in_flight_held(tmp_path):
    probs = problems(60)
    held: list[int] = []

    async with start_sim(profile(latency_ms=5), problems=probs) as sim:
        cfg = config(sim.base_url, run={"max_in_flight": 4})
        job = Job(cfg, tmp_path, progress=False)

        async def source():  # an async iterator: the job pulls one problem when it has room
            for i, p in enumerate(probs):
                held.append(i - job.finished)  # pulled but not finished, as this one is handed out
                yield p

        summary = await job.run(source())
    assert summary["status"] == "done"
    assert max(held) <= 4  # never more than max_in_flight problems in memory
    assert read_manifest(tmp_path)["problems_total"] == len(probs)  # counted as they streamed
    assert {r.id for r in iter_records(tmp_path, "problems")} == {p.id for p in probs}


def test_prior_records_are_indexed_and_read_one_problem_at_a_time(tmp_path):
    from fairdistill.engine.fair.resume import PriorRecords
    from fairdistill.engine.rundir.schema import ProblemDone
    from fairdistill.engine.rundir.store import RunStore

    store = RunStore(tmp_path, shard_records=3).open(["attempts", "problems"])
    for pid in ("p1", "p2", "p3"):
        for k in range(2):
            store.write(
                "attempts",
                Attempt(
                    id=f"{pid}/attempt/s/{k}", problem_id=pid, student="s", sample_index=k,
                    text=f"{pid} try {k}", answer=None, correct=False, prompt_version="v1",
                ),
            )  # fmt: skip
    store.write("problems", ProblemDone(id="p1", status="mistakes"))
    store.close("interrupted")

    prior = PriorRecords(tmp_path, ["attempts"], done={"p1"})
    assert len(prior) == 2  # p2 and p3 are unfinished; p1's records are not even indexed
    assert prior.get("p2/attempt/s/1") is None  # nothing read until its problem runs
    assert prior.load("p2") == 2 and prior.load("p1") == 0
    assert prior.get("p2/attempt/s/1").text == "p2 try 1"  # across a shard boundary (3 a shard)
    assert prior.get("p3/attempt/s/0") is None
    prior.drop("p2")
    assert prior.get("p2/attempt/s/1") is None


async def test_an_injected_executor_and_shared_admission_leave_the_stages_unchanged(tmp_path):
    """The same job through urllib-in-threads and one admission shared by every endpoint writes
    exactly the records of the default engine: the seams are below the stages."""
    from executors import UrllibExecutor

    from fairdistill.engine.request.admission import Admission

    probs = problems(20)
    async with start_sim(profile(), problems=probs) as sim:
        cfg = config(sim.base_url)
        await run(cfg, tmp_path / "default", probs)
        executor, shared = UrllibExecutor(), Admission(concurrency=6)
        parts = JobParts(executor=executor, admissions=dict.fromkeys(cfg.endpoints, shared))
        job = Job(cfg, tmp_path / "seams", progress=False, parts=parts)
        await job.run(iter(probs))
    assert executor.sent > 0 and executor.peak <= 6
    assert _sample_set(tmp_path / "seams") == _sample_set(tmp_path / "default")
    for kind in ("attempts", "rationales", "reviews", "feedback"):
        a = {r.id: msgspec.to_builtins(r) for r in iter_records(tmp_path / "default", kind)}
        b = {r.id: msgspec.to_builtins(r) for r in iter_records(tmp_path / "seams", kind)}
        assert a == b, kind
