"""The simulator over real loopback HTTP: limits, faults, reasoning content, replay, determinism."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import aiohttp
import pytest

from fairdistill.engine.fair.answers import extract_answer, is_correct
from fairdistill.engine.fair.prompts import prompt_set
from fairdistill.engine.fair.scoring import parse_score
from fairdistill.engine.rundir.schema import Problem
from fairdistill.engine.sim import (
    Burst,
    Faults,
    ModelProfile,
    SimProfile,
    SimThread,
    load_profile,
    named_profiles,
    start_sim,
)
from fairdistill.engine.sim.replay import AUTHORS, REVIEWERS, ReplayData, ReplayDataMissing, norm
from fairdistill.engine.sim.server import fmt_duration

PROMPTS = prompt_set()


def problems(n: int = 200) -> list[Problem]:
    out = [
        Problem(
            id=f"n{i}",
            question=f"Ann has {i + 3} pens and buys {2 * i + 1} more. How many pens does she have?",
            answer=str(3 * i + 4),
            task="numeric",
        )
        for i in range(n)
    ]
    out.append(Problem(id="y0", question="Can a penguin fly over the Alps?", answer="no", task="yesno"))
    out.append(
        Problem(
            id="c0",
            question="Which of the following can be derived?",
            context="All birds lay eggs. A robin is a bird.",
            options=("Robins lay eggs", "Robins are fish", "Robins swim", "Eggs are robins"),
            answer="A",
            task="choice",
        )
    )
    return out


def msgs(name: str, problem: Problem, **values: str) -> list[dict]:
    return [{"role": m.role, "content": m.content} for m in PROMPTS.render(name, problem, **values)]


async def chat(session: aiohttp.ClientSession, base_url: str, model: str, messages: list[dict], **params):
    """(status, headers, parsed body or raw bytes) of one chat request."""
    async with session.post(
        f"{base_url}/chat/completions", json={"model": model, "messages": messages, **params}
    ) as r:
        raw = await r.read()
        try:
            body = json.loads(raw)
        except ValueError:
            body = raw
        return r.status, r.headers, body


def text_of(body: dict, i: int = 0) -> str:
    return body["choices"][i]["message"]["content"]


# -- protocol ------------------------------------------------------------------------------------


async def test_models_health_and_unknown_model():
    profile = SimProfile(models={"a": ModelProfile(), "b": ModelProfile()})
    async with start_sim(profile) as sim, aiohttp.ClientSession() as s:
        assert sim.base_url.startswith("http://127.0.0.1:") and sim.base_url.endswith("/v1")
        async with s.get(f"{sim.base_url}/models") as r:
            assert [m["id"] for m in (await r.json())["data"]] == ["a", "b"]
        async with s.get(f"{sim.url}/health") as r:
            assert r.status == 200
        status, _, body = await chat(s, sim.base_url, "nope", [{"role": "user", "content": "hi"}])
        assert status == 404 and body["error"]["code"] == "model_not_found"
        status, _, body = await chat(s, sim.base_url, "a", [])
        assert status == 400
        status, headers, body = await chat(s, sim.base_url, "a", [{"role": "user", "content": "hi"}], n=3)
        assert status == 200 and len(body["choices"]) == 3
        assert body["usage"]["completion_tokens"] > 0 and body["usage"]["prompt_tokens"] > 0
        assert float(headers["x-sim-latency-ms"]) >= 0
        assert sim.stats.requests == 3 and sim.stats["ok"] == 1 and sim.stats.by_model["a"]["ok"] == 1


async def test_api_key_required_gives_401():
    async with start_sim(SimProfile(api_key="k", models={"a": ModelProfile()})) as sim:
        async with aiohttp.ClientSession() as s:
            status, _, _ = await chat(s, sim.base_url, "a", [{"role": "user", "content": "hi"}])
        async with aiohttp.ClientSession(headers={"Authorization": "Bearer k"}) as s:
            ok, _, _ = await chat(s, sim.base_url, "a", [{"role": "user", "content": "hi"}])
    assert (status, ok) == (401, 200)


async def test_max_tokens_truncates_with_finish_reason_length():
    probs = problems(3)
    profile = SimProfile(models={"m": ModelProfile(content="reasoning")})
    async with start_sim(profile, probs) as sim, aiohttp.ClientSession() as s:
        _, _, body = await chat(s, sim.base_url, "m", msgs("solve", probs[0]), max_tokens=5, seed=1)
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 5 and len(text_of(body)) <= 20


async def test_openai_sdk_talks_to_the_sim():
    openai = pytest.importorskip("openai")
    async with start_sim("fast") as sim:
        client = openai.AsyncOpenAI(base_url=sim.base_url, api_key="x", max_retries=0)
        done = await client.chat.completions.create(
            model="anything", messages=[{"role": "user", "content": "hello there"}], n=2
        )
        await client.close()
    assert len(done.choices) == 2 and done.choices[0].message.content.startswith("echo: hello")


def test_sim_thread_serves_synchronous_code():
    body = json.dumps({"model": "echo", "messages": [{"role": "user", "content": "ping"}]}).encode()
    with SimThread("fast") as sim:
        req = urllib.request.Request(
            f"{sim.base_url}/chat/completions", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=5) as r:
            reply = json.loads(r.read())
        assert sim.stats.ok == 1
    assert reply["choices"][0]["message"]["content"] == "echo: ping"


def test_named_profiles_load():
    names = named_profiles()
    for required in ("default", "fast", "realistic", "faulty", "committee", "replay-svamp"):
        assert required in names
    committee = load_profile("committee")
    teachers = [n for n, m in committee.models.items() if m.role == "teacher"]
    assert teachers == ["gpt-sim", "claude-sim", "gemini-sim"]
    assert len({committee.models[t].leniency for t in teachers}) == 3
    assert fmt_duration(0.02) == "20ms" and fmt_duration(1.2) == "1.2s" and fmt_duration(360) == "6m0s"


# -- hidden limits -------------------------------------------------------------------------------


async def test_rpm_limit_gives_429_with_headers_and_refills():
    # 1,200 rpm = 20/s with a 0.5 s bucket: 10 requests pass at once, the rest get 429.
    profile = SimProfile(models={"m": ModelProfile(rpm=1200, limit_burst_s=0.5)})
    hello = [{"role": "user", "content": "hi"}]
    async with start_sim(profile) as sim, aiohttp.ClientSession() as s:
        results = await asyncio.gather(*(chat(s, sim.base_url, "m", hello) for _ in range(30)))
        statuses = [r[0] for r in results]
        assert statuses.count(200) == 10 and statuses.count(429) == 20
        _, h, body = next(r for r in results if r[0] == 429)
        assert h["x-ratelimit-limit-requests"] == "1200"
        assert h["x-ratelimit-remaining-requests"] == "0"
        assert h["x-ratelimit-reset-requests"].endswith("s")
        assert int(h["retry-after"]) >= 1 and 0 < int(h["retry-after-ms"]) <= 100
        assert body["error"]["code"] == "rate_limit_exceeded"
        ok_headers = next(r[1] for r in results if r[0] == 200)
        assert "x-ratelimit-remaining-requests" in ok_headers
        await asyncio.sleep(0.2)  # 4 requests' worth refilled
        later = await asyncio.gather(*(chat(s, sim.base_url, "m", hello) for _ in range(10)))
        assert 3 <= [r[0] for r in later].count(200) <= 8
        assert sim.stats.http_429 == 20 + [r[0] for r in later].count(429)


async def test_sustained_rate_stays_at_the_hidden_limit():
    # A client hammering for ~1.2 s gets about rate * time + capacity requests through.
    profile = SimProfile(models={"m": ModelProfile(rpm=3000, limit_burst_s=0.2)})  # 50/s, bucket of 10
    hello = [{"role": "user", "content": "hi"}]
    async with start_sim(profile) as sim, aiohttp.ClientSession() as s:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 1.2:
            await asyncio.gather(*(chat(s, sim.base_url, "m", hello) for _ in range(8)))
            await asyncio.sleep(0.01)
        elapsed = time.monotonic() - t0
        assert sim.stats.http_429 > 0
        assert abs(sim.stats.ok - (50 * elapsed + 10)) <= 10


async def test_tpm_limit_counts_declared_tokens():
    profile = SimProfile(models={"m": ModelProfile(tpm=6000, limit_burst_s=1)})  # 100 tokens in the bucket
    hello = [{"role": "user", "content": "hi"}]
    async with start_sim(profile) as sim, aiohttp.ClientSession() as s:
        first = await chat(s, sim.base_url, "m", hello, max_tokens=60)
        second = await chat(s, sim.base_url, "m", hello, max_tokens=60)
    assert first[0] == 200 and second[0] == 429
    assert second[1]["x-ratelimit-limit-tokens"] == "6000" and second[2]["error"]["type"] == "tokens"


@pytest.mark.parametrize("sliding", [False, True], ids=["fixed", "sliding"])
async def test_window_limits_refuse_until_the_window_moves(sliding):
    """600 rpm over a 1 s window: 10 calls per window. A fixed window gives the whole budget back
    at its boundary; a sliding one as each call ages out of the last second."""
    shape = "sliding_window" if sliding else "fixed_window"
    profile = SimProfile(models={"m": ModelProfile(rpm=600, limit_shape=shape, limit_window_s=1.0)})
    hello = [{"role": "user", "content": "hi"}]
    async with start_sim(profile) as sim, aiohttp.ClientSession() as s:
        first = [(await chat(s, sim.base_url, "m", hello))[0] for _ in range(6)]
        await asyncio.sleep(0.5)
        second = [(await chat(s, sim.base_url, "m", hello))[0] for _ in range(6)]
        assert first == [200] * 6 and second == [200] * 4 + [429] * 2  # 10 in the window
        refused = await chat(s, sim.base_url, "m", hello)
        assert refused[0] == 429 and int(refused[1]["retry-after"]) >= 1
        await asyncio.sleep(0.6)  # past the first window / past the first six calls' second
        third = [(await chat(s, sim.base_url, "m", hello))[0] for _ in range(12)]
    # fixed: a fresh window of 10; sliding: only the first six calls have left the last second
    assert third.count(200) == (6 if sliding else 10), third


async def test_hidden_limits_send_no_rate_limit_headers():
    """``limit_headers = false``: no x-ratelimit-* on any reply, and a 429 says Retry-After: 1
    and nothing else about the limit."""
    profile = SimProfile(models={"m": ModelProfile(rpm=600, limit_burst_s=0.5, limit_headers=False)})
    hello = [{"role": "user", "content": "hi"}]
    async with start_sim(profile) as sim, aiohttp.ClientSession() as s:
        results = await asyncio.gather(*(chat(s, sim.base_url, "m", hello) for _ in range(12)))
    statuses = [r[0] for r in results]
    assert statuses.count(200) == 5 and statuses.count(429) == 7
    for status, headers, body in results:
        assert not [h for h in headers if h.lower().startswith(("x-ratelimit", "retry-after-ms"))]
        if status == 429:
            assert headers["retry-after"] == "1" and "try again later" in body["error"]["message"]


# -- faults --------------------------------------------------------------------------------------


async def test_faults_appear_at_configured_rates():
    faults = Faults(p_5xx=0.15, p_reset=0.1, p_malformed=0.1, p_truncated=0.05, p_empty=0.05, p_length=0.1)
    profile = SimProfile(seed=3, models={"m": ModelProfile(faults=faults)})
    n = 600
    seen: dict[str, int] = dict.fromkeys(("5xx", "reset", "malformed", "empty", "length", "ok"), 0)
    hello = [{"role": "user", "content": "a prompt of some length for the echo"}]
    async with start_sim(profile) as sim:
        sem = asyncio.Semaphore(32)
        async with aiohttp.ClientSession() as s:

            async def one() -> None:
                async with sem:
                    try:
                        status, _, body = await chat(s, sim.base_url, "m", hello)
                    except aiohttp.ClientError:
                        seen["reset"] += 1
                        return
                    if status >= 500:
                        seen["5xx"] += 1
                    elif not isinstance(body, dict):
                        seen["malformed"] += 1  # malformed and truncated both fail to parse
                    elif not body["choices"]:
                        seen["empty"] += 1
                    elif body["choices"][0]["finish_reason"] == "length":
                        seen["length"] += 1
                    else:
                        seen["ok"] += 1

            await asyncio.gather(*(one() for _ in range(n)))
        stats = sim.stats
    expect = {"5xx": 0.15, "reset": 0.1, "malformed": 0.15, "empty": 0.05, "length": 0.1, "ok": 0.45}
    for kind, p in expect.items():
        assert abs(seen[kind] / n - p) < 0.06, (kind, seen)
    assert stats.http_5xx == seen["5xx"] and stats.resets == seen["reset"]
    assert stats.malformed + stats.truncated == seen["malformed"]


async def test_hang_is_cancelled_when_the_client_gives_up():
    profile = SimProfile(models={"m": ModelProfile(faults=Faults(p_hang=1.0, hang_s=300))})
    async with start_sim(profile) as sim:
        timeout = aiohttp.ClientTimeout(total=0.3)
        async with aiohttp.ClientSession(timeout=timeout) as s:
            with pytest.raises(asyncio.TimeoutError):
                await chat(s, sim.base_url, "m", [{"role": "user", "content": "hi"}])
        for _ in range(50):
            if sim.in_flight == 0:
                break
            await asyncio.sleep(0.02)
        assert sim.in_flight == 0 and sim.stats.hangs == 1 and sim.stats.hangs_cancelled == 1


async def test_fault_burst_comes_and_goes():
    faults = Faults(bursts=[Burst(kind="5xx", every_s=0.4, duration_s=0.2)])
    hello = [{"role": "user", "content": "hi"}]
    statuses = []
    async with (
        start_sim(SimProfile(models={"m": ModelProfile(faults=faults)})) as sim,
        aiohttp.ClientSession() as s,
    ):
        for _ in range(16):
            statuses.append((await chat(s, sim.base_url, "m", hello))[0])
            await asyncio.sleep(0.05)
    assert 4 <= statuses.count(200) <= 12 and statuses.count(200) + sum(s >= 500 for s in statuses) == 16


# -- reasoning content ---------------------------------------------------------------------------


async def _replies(sim, model: str, requests: list[list[dict]], **params) -> list[str]:
    async with aiohttp.ClientSession() as s:
        results = await asyncio.gather(*(chat(s, sim.base_url, model, m, **params) for m in requests))
    return [text_of(body) for _, _, body in results]


async def test_solve_is_right_at_skill_rate_and_ends_with_the_answer():
    probs = problems(200)
    profile = SimProfile(models={"t": ModelProfile(content="reasoning", skill=0.7)})
    async with start_sim(profile, probs) as sim:
        texts = await _replies(sim, "t", [msgs("solve", p) for p in probs], seed=11)
    right = 0
    for p, text in zip(probs, texts, strict=True):
        assert text.rstrip().splitlines()[-1].startswith("The answer is ")
        right += is_correct(extract_answer(text, p.task), p.answer, p.task)
    assert abs(right / len(probs) - 0.7) < 0.1


async def test_student_is_wrong_at_one_minus_skill():
    probs = problems(150)
    profile = SimProfile(models={"s": ModelProfile(content="reasoning", role="student", skill=0.2)})
    async with start_sim(profile, probs) as sim:
        texts = await _replies(sim, "s", [msgs("solve", p) for p in probs], seed=2)
    wrong = sum(
        not is_correct(extract_answer(t, p.task), p.answer, p.task) for p, t in zip(probs, texts, strict=True)
    )
    assert abs(wrong / len(probs) - 0.8) < 0.1


async def test_feedback_mentions_gold_and_unknown_question_is_generic():
    probs = problems(5)
    async with start_sim(SimProfile(models={"t": ModelProfile(content="reasoning")}), probs) as sim:
        fb, generic = await _replies(
            sim,
            "t",
            [
                msgs(
                    "feedback", probs[2], student_answer="They have 3. The answer is 3.", gold=probs[2].answer
                ),
                [{"role": "user", "content": "Question: what is the airspeed of a swallow?"}],
            ],
            seed=0,
        )
    assert probs[2].answer in fb and "student" in fb.lower()
    assert "The answer is" not in generic


async def test_reviews_end_in_a_score_higher_for_right_solutions_and_follow_leniency():
    probs = problems(120)[:120]
    models = {
        "lenient": ModelProfile(content="reasoning", leniency=0.8),
        "harsh": ModelProfile(content="reasoning", leniency=-0.8),
        "sloppy": ModelProfile(content="reasoning", invalid_review_rate=0.3),
    }
    right = [
        msgs("review", p, solution=f"Adding gives {p.answer}.\nThe answer is {p.answer}.") for p in probs
    ]
    wrong = [
        msgs("review", p, solution=f"Adding gives {int(p.answer) + 5}.\nThe answer is {int(p.answer) + 5}.")
        for p in probs
    ]
    async with start_sim(SimProfile(models=models), probs) as sim:
        scores = {}
        for model in ("lenient", "harsh"):
            for label, reqs in (("right", right), ("wrong", wrong)):
                texts = await _replies(sim, model, reqs, seed=5)
                assert all(t.rstrip().endswith("]") for t in texts)
                scores[model, label] = statistics.mean(parse_score(t) for t in texts)
        sloppy = await _replies(sim, "sloppy", right, seed=5)
    for model in ("lenient", "harsh"):
        assert scores[model, "right"] - scores[model, "wrong"] > 1.5, scores
    assert scores["lenient", "right"] > scores["harsh", "right"]
    assert scores["lenient", "wrong"] > scores["harsh", "wrong"]
    invalid = sum(parse_score(t) is None for t in sloppy) / len(sloppy)
    assert 0.15 < invalid < 0.45


async def test_choice_and_yesno_problems_are_answered_in_their_format():
    probs = problems(0)
    profile = SimProfile(models={"t": ModelProfile(content="reasoning", skill=1.0)})
    async with start_sim(profile, probs) as sim:
        texts = await _replies(sim, "t", [msgs("solve", p) for p in probs], seed=0)
    assert [extract_answer(t, p.task) for p, t in zip(probs, texts, strict=True)] == ["no", "A"]


async def test_content_is_deterministic_under_seed():
    probs = problems(20)
    profile = SimProfile(seed=1, models={"t": ModelProfile(content="reasoning", skill=0.5)})
    reqs = [msgs("solve", p) for p in probs]
    async with start_sim(profile, probs) as sim:
        a = await _replies(sim, "t", reqs, seed=42)
        b = await _replies(sim, "t", reqs, seed=42)
        c = await _replies(sim, "t", reqs, seed=43)
        async with aiohttp.ClientSession() as s:
            _, _, multi = await chat(s, sim.base_url, "t", reqs[0], seed=42, n=4)
    async with start_sim(profile, probs) as again:  # a fresh server: same content
        d = await _replies(again, "t", reqs, seed=42)
    assert a == b == d and a != c
    assert text_of(multi, 0) == a[0] and len({text_of(multi, i) for i in range(4)}) > 1


# -- replay --------------------------------------------------------------------------------------


async def test_replay_serves_the_papers_real_svamp_text(datasets_dir: Path, monkeypatch):
    monkeypatch.setenv("FAIR_DATA_DIR", str(datasets_dir))
    release = datasets_dir / "fair-release"
    rows = json.loads((release / "Llama-2-7b-chat-hf_svamp_rationale_round0.json").read_text())
    feedback = json.loads((release / "Llama-2-7b-chat-hf_svamp_feedback_round0.json").read_text())
    row = next(r for r in rows if r["gpt_rationale"][1] != r["gpt_rationale"][2])  # tells reviewers apart
    fb = next(f for f in feedback if f["question"] == row["question"])
    problem = Problem(id="x", question=row["question"], answer=row["gold_answer"], task="numeric")
    profile = load_profile("replay-svamp")
    async with start_sim(profile) as sim:
        (solve,) = await _replies(sim, "gpt", [msgs("solve", problem)], seed=0)
        (explain,) = await _replies(
            sim,
            "mistral",
            [msgs("feedback", problem, student_answer=row["student_wrong_pred"], gold="1")],
            seed=0,
        )
        review = msgs("review", problem, solution=row["gpt_rationale"][0])
        (by_gemini,) = await _replies(sim, "gemini", [review], seed=0)
        (by_mistral,) = await _replies(sim, "mistral", [review], seed=0)
        (student,) = await _replies(sim, "student", [msgs("solve", problem)], seed=0)
    assert solve == row["gpt_rationale"][0]
    assert explain == fb["mistral_feedback"]
    # documented assumption: gpt's rationale is scored by (gemini, mistral), in that order
    assert (parse_score(by_gemini), parse_score(by_mistral)) == tuple(row["gpt_rationale"][1:3])
    assert student == row["student_wrong_pred"]


async def test_replay_review_of_a_text_that_recurs_scores_it_for_its_own_question(
    datasets_dir: Path, monkeypatch
):
    """Short rationales ("6", "$24") recur across questions with different recorded scores; a
    review must get the scores recorded for the question it is about."""
    monkeypatch.setenv("FAIR_DATA_DIR", str(datasets_dir))
    release = datasets_dir / "fair-release" / "Llama-2-7b-chat-hf_svamp_rationale_round0.json"
    written: dict[str, list[tuple[dict, str]]] = {}  # text -> (row, author) that wrote it
    for row in json.loads(release.read_text()):
        for author in AUTHORS:
            if row.get(f"{author}_rationale"):
                written.setdefault(norm(row[f"{author}_rationale"][0]), []).append((row, author))
    first, second = next(
        (a, b)
        for group in written.values()
        for a in group
        for b in group
        if a[0]["question"] != b[0]["question"]
        and a[0][f"{a[1]}_rationale"][1:3] != b[0][f"{b[1]}_rationale"][1:3]
    )
    async with start_sim(load_profile("replay-svamp")) as sim:
        for row, author in (first, second):
            problem = Problem(id="x", question=row["question"], answer=row["gold_answer"], task="numeric")
            review = msgs("review", problem, solution=row[f"{author}_rationale"][0])
            got = [parse_score((await _replies(sim, r, [review], seed=0))[0]) for r in REVIEWERS[author]]
            assert got == row[f"{author}_rationale"][1:3]


def test_replay_without_data_says_where_it_looked(tmp_path: Path):
    with pytest.raises(ReplayDataMissing, match="no recorded data"):
        ReplayData.load(tmp_path)


def test_fair_sim_runs_standalone_and_stops_on_sigterm():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "fairdistill", "sim", "--profile", "fast", "--port", str(port)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        for _ in range(100):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    assert r.status == 200
                    break
            except OSError:
                time.sleep(0.1)
        else:
            pytest.fail("fair sim did not come up")
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0 and b"fair sim: profile 'fast'" in err
