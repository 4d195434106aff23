"""Key pools in one process, over loopback HTTP to the simulator with keys: spreading, a key's
own limit, retirement on 401, the end of the pool, affinity and per-organisation caches, group
limits from the config."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import msgspec
import pytest

from fairdistill.engine.config import EndpointConfig
from fairdistill.engine.errors import AuthError
from fairdistill.engine.request.client import Engine
from fairdistill.engine.request.keypool import KeyPool
from fairdistill.engine.sim.profiles import profile_from_dict
from fairdistill.engine.sim.server import SimServer, SimThread
from fairdistill.engine.types import ChatRequest, user

VALUES = {
    "a": "sk-pool-test-a-7f3e9c1d2b",
    "b": "sk-pool-test-b-4a8d6e0f1c",
    "c": "sk-pool-test-c-9b2c5d7e3a",
}


def sim_profile(keys: dict[str, dict], groups: dict[str, dict] | None = None, **model) -> object:
    return profile_from_dict(
        {
            "name": "pool-test",
            "default_model": "sim",
            "models": {"sim": {"content": "echo", "latency_ms": 5, **model}},
            "keys": {label: {"value": VALUES[label], **k} for label, k in keys.items()},
            "groups": groups or {},
        }
    )


def endpoint(sim: SimServer, keys: list[dict], **kw) -> dict[str, EndpointConfig]:
    cfg = {"name": "gpt", "base_url": sim.base_url, "model": "sim", "keys": keys, "concurrency": 32, **kw}
    return {"gpt": msgspec.convert(cfg, EndpointConfig)}


@pytest.fixture(autouse=True)
def key_env(monkeypatch):
    for label, value in VALUES.items():
        monkeypatch.setenv(f"POOL_KEY_{label.upper()}", value)


def env(label: str) -> str:
    return f"POOL_KEY_{label.upper()}"


def req(i: int, text: str = "question") -> ChatRequest:
    return ChatRequest(messages=user(f"{text} {i}"), max_tokens=8)


async def run_all(engine: Engine, n: int, **kw) -> list:
    return await asyncio.gather(*(engine.complete("gpt", req(i), **kw) for i in range(n)))


async def test_calls_spread_over_every_key_with_its_own_credentials():
    async with SimServer(sim_profile({"a": {}, "b": {}, "c": {}})) as sim:
        async with Engine(endpoint(sim, [{"env": env(k)} for k in "abc"])) as engine:
            done = await run_all(engine, 300)
        by_key = sim.stats.by_key
    assert len(done) == 300
    assert sum(by_key[k]["requests"] for k in "abc") == 300
    assert all(by_key[k]["requests"] >= 60 for k in "abc"), dict(by_key)  # each key had its share
    assert not any(by_key[k]["http_401"] for k in "abc")


async def test_a_keys_429s_slow_that_key_alone():
    """Key a hides a 2 req/s limit; b and c have none: a's 429s must not hold b and c back."""
    profile = sim_profile({"a": {"rpm": 120, "limit_burst_s": 1}, "b": {}, "c": {}})
    async with SimServer(profile) as sim:
        cfg = endpoint(sim, [{"env": env(k)} for k in "abc"])
        async with Engine(cfg) as engine:
            t0 = time.monotonic()
            await run_all(engine, 600)
            took = time.monotonic() - t0
        by_key = sim.stats.by_key
    ok_a = by_key["a"]["ok"]
    assert by_key["b"]["ok"] + by_key["c"]["ok"] + ok_a == 600
    assert ok_a < 60, dict(by_key)  # a got about what its limit lets through, no more
    assert by_key["b"]["ok"] > 200 and by_key["c"]["ok"] > 200
    assert took < 20, took  # at a's pace alone 600 calls would take 300 s


async def test_a_revoked_key_is_retired_and_its_calls_go_on_the_others(capsys):
    profile = sim_profile({"a": {}, "b": {"revoke_after_requests": 30}, "c": {}})
    async with SimServer(profile) as sim:
        async with Engine(endpoint(sim, [{"env": env(k)} for k in "abc"])) as engine:
            done = await run_all(engine, 400)
            pool = engine.lanes["gpt"].admission
        by_key = sim.stats.by_key
    assert len(done) == 400 and all(d.text.startswith("echo:") for d in done)
    assert isinstance(pool, KeyPool)
    assert [k.live for k in pool.keys] == [True, False, True]
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "POOL_KEY_B" in line]
    assert len(lines) == 1 and "retired for this run, 2 of 3 keys left" in lines[0]
    assert all(v not in err for v in VALUES.values())
    assert by_key["b"]["ok"] == 30  # nothing more went out on b once it was refused...
    assert by_key["b"]["http_401"] <= 32  # ...but the calls already in flight on it


async def test_the_run_aborts_only_when_every_key_is_refused():
    profile = sim_profile({"a": {"revoke_after_requests": 5}, "b": {"revoke_after_requests": 5}})
    async with (
        SimServer(profile) as sim,
        Engine(endpoint(sim, [{"env": env("a")}, {"env": env("b")}])) as engine,
    ):
        results = await asyncio.gather(
            *(engine.complete("gpt", req(i)) for i in range(40)), return_exceptions=True
        )
        with pytest.raises(AuthError) as later:
            await engine.complete("gpt", req(999))
    ok = [r for r in results if not isinstance(r, BaseException)]
    errors = [r for r in results if isinstance(r, BaseException)]
    assert len(ok) == 10 and errors and all(isinstance(e, AuthError) for e in errors)
    message = str(errors[0])
    assert "POOL_KEY_A" in message and "POOL_KEY_B" in message
    assert all(v not in message for v in VALUES.values())
    assert isinstance(later.value, AuthError)


async def test_an_admin_revocation_mid_run_loses_nothing():
    async with (
        SimServer(sim_profile({"a": {}, "b": {}}, latency_ms=20)) as sim,
        Engine(endpoint(sim, [{"env": env("a")}, {"env": env("b")}])) as engine,
    ):
        task = asyncio.gather(*(engine.complete("gpt", req(i)) for i in range(300)))
        while sim.stats["ok"] < 100:
            await asyncio.sleep(0.01)
        async with aiohttp.ClientSession() as http, http.post(f"{sim.url}/sim/keys/a/revoke") as resp:
            assert resp.status == 200
        done = await task
    assert len(done) == 300
    assert sim.stats.by_key["b"]["ok"] > 0 and sim.stats.by_key["a"]["http_401"] > 0


def prompts(problem: int) -> list[ChatRequest]:
    """Three prompts of one problem: a long shared first message (the cached prefix), then
    different asks."""
    question = f"Problem {problem}: " + " ".join(f"word{problem}-{i}" for i in range(200))
    asks = ("solve", "explain", "review")
    return [ChatRequest(messages=user(ask, system=question), max_tokens=8) for ask in asks]


async def cached_share(affinity: bool) -> float:
    profile = sim_profile({"a": {}, "b": {}, "c": {}}, prompt_cache=True, cache_min_tokens=0)
    async with SimServer(profile) as sim:
        cfg = endpoint(sim, [{"env": env(k)} for k in "abc"], key_affinity=affinity, concurrency=3)
        async with Engine(cfg) as engine:
            for p in range(12):  # one problem's calls one after another, as a stage sends them
                for r in prompts(p):
                    await engine.complete("gpt", r, affinity=f"p{p}")
        keys = sim.stats.by_key
    cached = sum(keys[k]["cached_tokens"] for k in "abc")
    return cached / sum(keys[k]["prompt_tokens"] for k in "abc")


async def test_affinity_keeps_a_problem_on_one_organisations_cache():
    on, off = await cached_share(True), await cached_share(False)
    assert on > 0.3, on
    assert on > off * 1.5, (on, off)


async def test_configured_group_and_endpoint_limits_are_shared_by_their_keys():
    """Keys a and b share org-ab's configured 600 rpm (10/s, a 1 s burst): 40 calls take ~3 s
    however many keys carry them, and the server never refuses one."""
    async with SimServer(sim_profile({"a": {"group": "org-ab"}, "b": {"group": "org-ab"}})) as sim:
        keys = [{"env": env("a"), "group": "org-ab"}, {"env": env("b"), "group": "org-ab"}]
        cfg = endpoint(sim, keys, groups={"org-ab": {"rpm": 600}})
        async with Engine(cfg) as engine:
            t0 = time.monotonic()
            await run_all(engine, 40)
            took = time.monotonic() - t0
    assert 2.5 < took < 8, took
    assert sim.stats["http_429"] == 0
    assert sim.stats.by_key["a"]["requests"] > 5 and sim.stats.by_key["b"]["requests"] > 5


# -- the real command ---------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


def fair(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fairdistill", *args], cwd=ROOT, capture_output=True, text=True,
        timeout=180, env={**os.environ, **(env or {})},
    )  # fmt: skip


def inputs(path: Path, n: int) -> Path:
    path.write_text("".join(f'{{"id": "q{i}", "prompt": "question {i}"}}\n' for i in range(n)))
    return path


def test_fair_generate_with_a_pool_survives_a_revoked_key(tmp_path: Path):
    profile = tmp_path / "keys.toml"
    profile.write_text(
        'default_model = "sim"\n[models.sim]\ncontent = "echo"\nlatency_ms = 5\n'
        + "".join(f'[keys.{k}]\nvalue = "{v}"\n' for k, v in VALUES.items())
        + "revoke_after_requests = 25\n"  # key c
    )
    with SimThread(str(profile)) as sim:
        proc = fair(
            "generate", "--endpoint", sim.base_url, "--model", "sim", "--input",
            str(inputs(tmp_path / "in.jsonl", 300)), "--output", str(tmp_path / "out"), "--no-progress",
            "--key", env("a"), "--key", f"{env('b')}@org-b", "--key", env("c"),
            env={env(k): v for k, v in VALUES.items()},
        )  # fmt: skip
        by_key = sim.stats.by_key
    assert proc.returncode == 0, proc.stderr
    assert "300 new ok" in proc.stderr
    retired = [line for line in proc.stderr.splitlines() if "retired" in line]
    assert len(retired) == 1 and env("c") in retired[0], proc.stderr
    assert by_key["c"]["ok"] == 25 and by_key["a"]["ok"] + by_key["b"]["ok"] == 275
    written = "".join(p.read_text(errors="replace") for p in (tmp_path / "out").rglob("*") if p.is_file())
    for value in VALUES.values():
        assert value not in proc.stderr + proc.stdout + written
    assert f'"key":"{env("c")}"' in written  # the trace names the variable


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--key", "sk-proj-abcdefghijklmnopqrstuvwxyz012345"], "NAME of an environment variable"),
        (["--key", "POOL_KEY_A", "--api-key-env", "POOL_KEY_B"], "not both"),
        (["--key", "POOL_KEY_A", "--key", "POOL_KEY_A"], "POOL_KEY_A is listed twice"),
        (["--key", "POOL_KEY_A", "--key", "NOT_SET_ANYWHERE"], "NOT_SET_ANYWHERE"),
        (["--no-key-affinity"], "--no-key-affinity"),
    ],
)
def test_misused_key_flags_are_one_line_exit_2(tmp_path: Path, flags: list[str], needle: str):
    proc = fair(
        "generate", "--endpoint", "http://127.0.0.1:9/v1", "--model", "m", "--input",
        str(inputs(tmp_path / "in.jsonl", 1)), "--output", str(tmp_path / "out"), *flags,
        env={"POOL_KEY_A": VALUES["a"], "POOL_KEY_B": VALUES["b"]},
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and needle in proc.stderr.strip().splitlines()[-1]
    assert "abcdefghijklmnop" not in proc.stderr


def test_a_config_with_keys_and_api_key_env_names_the_endpoint(tmp_path: Path):
    cfg = tmp_path / "job.toml"
    cfg.write_text(
        '[endpoints.gpt]\nbase_url = "http://127.0.0.1:9/v1"\nmodel = "m"\napi_key_env = "X"\n'
        'keys = [{ env = "A" }]\n'
    )
    proc = fair("run", str(cfg), "--run-dir", str(tmp_path / "run"))
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "job.toml" in last and "endpoints.gpt" in last and "not both" in last, proc.stderr


async def test_a_hidden_group_limit_is_learned_once_for_the_group():
    """Keys a and b have no limit of their own; their organisation hides 2,400 rpm (40/s, a 1 s
    burst). The group's 429s teach the group's pace, not each key's against the other's: the
    pool settles near 40/s with few 429s, both keys serving."""
    profile = sim_profile(
        {"a": {"group": "org-ab"}, "b": {"group": "org-ab"}},
        {"org-ab": {"rpm": 2400, "limit_burst_s": 1}},
        latency_ms=50,
    )
    async with SimServer(profile) as sim:
        keys = [{"env": env("a"), "group": "org-ab"}, {"env": env("b"), "group": "org-ab"}]
        async with Engine(endpoint(sim, keys, concurrency=64)) as engine:
            t0 = time.monotonic()
            await run_all(engine, 500)
            took = time.monotonic() - t0
            pool = engine.lanes["gpt"].admission
        by_key, group = sim.stats.by_key, sim.stats.by_group["org-ab"]
    assert isinstance(pool, KeyPool)
    learner = pool._learned["org-ab"]
    assert learner.rate is not None and 25 < learner.rate < 60, learner.rate
    assert group["ok"] == 500 and min(by_key["a"]["ok"], by_key["b"]["ok"]) > 100, dict(by_key)
    assert group["http_429"] < 0.15 * group["ok"], dict(group)
    assert took < 500 / 40 * 1.6, took  # 12.5 s at the hidden limit
