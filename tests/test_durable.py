"""A SIGKILL re-pays only the calls in flight: every answer is committed to the response cache
within milliseconds of arriving (engine.request.cache), so a killed and resumed run pays again
only what the simulator was still answering at the kill. Each kill lands at a random moment;
the simulator's in-flight gauge is read at that instant."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
from pathlib import Path

import msgspec
from fakeserver import write_input

from fairdistill.engine.rundir.schema import Problem
from fairdistill.engine.rundir.store import iter_raw
from fairdistill.engine.sim import ModelProfile, SimProfile, start_sim

# Answers that left the simulator but were not yet committed when the kill landed (on the wire,
# being parsed, or queued for the cache writer): the writer commits within ~1-5 ms, so at most a
# few per kill at these rates (measured 0-3); the old 256-entry / 0.5 s batches lost 20-70 a kill.
SLACK_PER_KILL = 6


async def _run(*args: str, sim=None, kill_at: int | None = None) -> tuple[int, int]:
    """``fair ARGS`` as a child. ``kill_at``: SIGKILL it once the simulator has counted that many
    requests; returns (exit code, calls in flight at the kill). In flight = the gauge read at the
    kill plus the requests the simulator counts after it (sent before the kill, read later)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fairdistill", *args,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    in_flight = 0
    if kill_at is not None:
        while proc.returncode is None and sim.stats["requests"] < kill_at:
            await asyncio.sleep(0.002)
        if proc.returncode is None:
            gauge, counted = sim.in_flight, sim.stats["requests"]  # no await between: one instant
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
            await _settled(sim)  # requests already sent reach the simulator now
            in_flight = gauge + sim.stats["requests"] - counted
    _, err = await proc.communicate()
    assert proc.returncode in (0, -signal.SIGKILL), err.decode()[-2000:]
    return proc.returncode, in_flight


async def _settled(sim, quiet_s: float = 0.3, limit_s: float = 5.0) -> None:
    """Until the simulator has handled everything the killed client sent (a loaded machine can
    take a while to read the requests queued on its sockets)."""
    loop = asyncio.get_running_loop()
    end, last, since = loop.time() + limit_s, -1, loop.time()
    while loop.time() < end:
        if sim.stats["requests"] != last or sim.in_flight:
            last, since = sim.stats["requests"], loop.time()
        elif loop.time() - since >= quiet_s:
            return
        await asyncio.sleep(0.02)


async def _kill_three_times(args: list[str], sim, paid_ref: int, rng: random.Random) -> tuple[int, int]:
    """Kill ``fair ARGS`` three times at random moments, then let it finish. Returns (calls paid
    by the four runs, calls in flight at the kills)."""
    start, in_flight, kills = sim.stats["requests"], 0, 0
    for _ in range(3):
        at = sim.stats["requests"] + int(paid_ref * rng.uniform(0.08, 0.25))
        rc, n = await _run(*args, sim=sim, kill_at=at)
        in_flight += n
        kills += rc == -signal.SIGKILL
    assert kills == 3, "the run finished before the third kill: make it longer"
    rc, _ = await _run(*args)
    assert rc == 0
    return sim.stats["requests"] - start, in_flight


async def test_killed_generate_repays_only_the_calls_in_flight(tmp_path):
    n = 1500
    inp = write_input(tmp_path / "in.jsonl", n)
    fast = SimProfile(name="t", seed=1, default_model="m", models={"m": ModelProfile(latency_ms=15)})
    rng = random.Random()
    async with start_sim(fast) as sim:

        def args(out: Path) -> list[str]:
            return ["generate", "--endpoint", sim.base_url, "--model", "m", "--input", str(inp),
                    "--output", str(out), "--no-progress", "--concurrency", "8"]  # fmt: skip

        assert (await _run(*args(tmp_path / "ref")))[0] == 0
        paid_ref = sim.stats["requests"]
        assert paid_ref == n
        paid, in_flight = await _kill_three_times(args(tmp_path / "out"), sim, paid_ref, rng)
    got = {r["id"]: r["texts"] for r in iter_raw(tmp_path / "out", "responses")}
    assert got == {r["id"]: r["texts"] for r in iter_raw(tmp_path / "ref", "responses")}
    repaid = paid - paid_ref
    assert repaid <= in_flight + 3 * SLACK_PER_KILL, (repaid, in_flight)


def _problems(n: int) -> list[Problem]:
    return [
        Problem(id=f"p{i:03d}", question=f"Ann has {i + 3} pens and buys {2 * i + 1} more. How many pens?",
                answer=str(3 * i + 4), task="numeric", dataset="synthetic")
        for i in range(n)
    ]  # fmt: skip


def _fair_job(tmp_path: Path, base_url: str, probs: list[Problem], names: list[str]) -> Path:
    data = tmp_path / "problems.jsonl"
    data.write_bytes(b"".join(msgspec.json.encode({"id": p.id, "question": p.question, "answer": p.answer})
                              + b"\n" for p in probs))  # fmt: skip
    eps = "".join(f'[endpoints.{n}]\nbase_url = "{base_url}"\nmodel = "{n}"\n' for n in names)
    job = tmp_path / "job.toml"
    job.write_text(
        f'[run]\nseed = 3\nmax_in_flight = 8\n[dataset]\nname = "jsonl"\npath = "{data}"\ntask = "numeric"\n'
        '[student]\nendpoint = "student"\nattempts = 2\ntemperature = 0.7\n'
        '[teachers]\nendpoints = ["t-good", "t-mid", "t-harsh"]\n' + eps
    )
    return job


async def test_killed_fair_run_repays_only_the_calls_in_flight(tmp_path):
    probs = _problems(80)
    teachers = {
        "t-good": ModelProfile(content="reasoning", skill=0.9, leniency=0.3, latency_ms=20),
        "t-mid": ModelProfile(content="reasoning", skill=0.7, leniency=0.0, latency_ms=20),
        "t-harsh": ModelProfile(content="reasoning", skill=0.8, leniency=-0.8, latency_ms=20),
    }
    student = ModelProfile(content="reasoning", role="student", skill=0.4, latency_ms=20)
    rng = random.Random()
    async with start_sim(
        SimProfile(name="t", seed=7, models={**teachers, "student": student}), problems=probs
    ) as sim:
        job = _fair_job(tmp_path, sim.base_url, probs, [*teachers, "student"])
        ref, out = tmp_path / "ref", tmp_path / "out"
        assert (await _run("run", str(job), "--run-dir", str(ref), "--no-progress"))[0] == 0
        paid_ref = sim.stats["requests"]
        args = ["run", str(job), "--run-dir", str(out), "--no-progress"]
        paid, in_flight = await _kill_three_times(args, sim, paid_ref, rng)
    samples = {r["id"]: r["response"] for r in iter_raw(out, "samples")}
    assert samples and samples == {r["id"]: r["response"] for r in iter_raw(ref, "samples")}
    repaid = paid - paid_ref
    assert repaid <= in_flight + 3 * SLACK_PER_KILL, (repaid, in_flight)


async def test_a_read_only_cache_is_one_line_naming_it_exit_2(tmp_path):
    inp = write_input(tmp_path / "in.jsonl", 20)
    fast = SimProfile(name="t", seed=1, default_model="m", models={"m": ModelProfile(latency_ms=0)})
    async with start_sim(fast) as sim:
        args = ["generate", "--endpoint", sim.base_url, "--model", "m", "--input", str(inp),
                "--output", str(tmp_path / "out"), "--no-progress"]  # fmt: skip
        assert (await _run(*args))[0] == 0
        cache = tmp_path / "out" / "cache.sqlite"
        before = cache.read_bytes()
        cache.chmod(0o444)
        (tmp_path / "in.jsonl").write_bytes(inp.read_bytes() + b'{"id": "new", "prompt": "q"}\n')
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "fairdistill", *args, stderr=asyncio.subprocess.PIPE
        )
        _, err = await proc.communicate()
    lines = err.decode().strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, err.decode()
    assert str(cache) in lines[0] and "read-only" in lines[0] and "Traceback" not in err.decode()
    assert cache.read_bytes() == before  # not moved aside as damaged, not written
