"""The API key never reaches stderr, stdout, records, trace, manifest, cache or any repr,
even when a careless server echoes it back in its error messages; nor does any key of a pool
(three keys, one revoked mid-run), in ``fair generate`` or ``fair run``, nor ``/metrics``."""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path

import orjson
import pytest
import tomli_w
from fakeserver import FakeServer, fair, gen_args, write_input
from test_keys_observe import GROUPS as POOL_GROUPS
from test_keys_observe import VALUES as POOL_VALUES
from test_keys_observe import key_flags, pool_profile, revoke
from test_metrics import free_port

import fairdistill.engine.request.client as client_mod
from fairdistill.engine.config import EndpointConfig
from fairdistill.engine.errors import AuthError, RequestError
from fairdistill.engine.request.client import Engine
from fairdistill.engine.sim import start_sim
from fairdistill.engine.types import ChatRequest, user

KEY = "sk-test-SECRET123"
ENV = "FAIR_TEST_API_KEY"


def leaked(text: str | bytes) -> bool:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return KEY in text or "SECRET123" in text


def assert_no_key_under(folder) -> None:
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert files
    for p in files:
        assert not leaked(p.read_bytes()), f"key found in {p}"


async def test_key_never_leaks_from_a_generate_run_against_an_echoing_server(tmp_path):
    inp = write_input(tmp_path / "in.jsonl", 30)

    def rule(seen):
        text = str(seen.body)
        if "question 3" in text:
            return "status:400"  # the error message repeats the Authorization header
        if "question 5" in text:
            return "status:500"  # every retry too, until the record fails
        return None

    async with FakeServer(rule=rule, echo_auth=True) as srv:
        out = tmp_path / "out"
        args = gen_args(srv, inp, out, "--api-key-env", ENV, "--max-attempts", "2")
        rc, stdout, stderr = await fair(*args, env={ENV: KEY})
        assert srv.seen[0].headers["Authorization"] == f"Bearer {KEY}"  # the key was really used
        assert rc == 1, stderr
        assert "status 400 from the fake server" in stderr  # the server's message is shown...
        assert not leaked(stderr) and not leaked(stdout)  # ...without the key in it
        assert_no_key_under(out)

        srv.rule = lambda s: "status:401"
        rc, stdout, stderr = await fair(
            *gen_args(srv, inp, tmp_path / "out2", "--api-key-env", ENV), env={ENV: KEY}
        )
        assert rc == 3 and "refused the credentials" in stderr and ENV in stderr
        assert not leaked(stderr) and not leaked(stdout)
        assert_no_key_under(tmp_path / "out2")


@pytest.mark.parametrize("provider", ["openai", "anthropic", "gemini"])
async def test_key_not_in_exceptions_or_reprs(monkeypatch, provider):
    monkeypatch.setenv(ENV, KEY)
    monkeypatch.setattr(client_mod, "BACKOFF_BASE_S", 0.01)
    async with FakeServer(echo_auth=True, rule=lambda s: "status:400") as srv:
        cfg = EndpointConfig(provider=provider, base_url=srv.url, model="m", api_key_env=ENV, max_attempts=2)
        async with Engine({"a": cfg}) as engine:
            with pytest.raises(RequestError) as err:
                await engine.complete("a", ChatRequest(messages=user("q")))
            assert "you sent" in str(err.value) and not leaked(str(err.value))
            assert not leaked(repr(engine)) and not leaked(repr(engine._lanes)) and not leaked(repr(cfg))
            target = engine.lanes["a"].target  # what the executor is handed: no key shown
            assert not leaked(repr(target)) and any(leaked(v) for v in target.headers.values())
            assert not leaked(str(engine.snapshot()))
            srv.rule = lambda s: "status:500"
            with pytest.raises(RequestError) as err:
                await engine.complete("a", ChatRequest(messages=user("q2")))
            assert not leaked(str(err.value))
            srv.rule = lambda s: "status:403"
            with pytest.raises(AuthError) as err:
                await engine.complete("a", ChatRequest(messages=user("q3")))
            assert not leaked(str(err.value)) and not leaked(repr(err.value))
        header = {"openai": "Authorization", "anthropic": "x-api-key", "gemini": "x-goog-api-key"}[provider]
        assert KEY in srv.seen[0].headers[header]
        assert all(KEY not in s.path for s in srv.seen)  # never in a URL


async def test_a_key_passed_where_the_variable_name_belongs_is_not_echoed(tmp_path):
    inp = write_input(tmp_path / "in.jsonl", 1)
    async with FakeServer() as srv:
        rc, stdout, stderr = await fair(*gen_args(srv, inp, tmp_path / "out", "--api-key-env", KEY))
    assert rc == 2 and "NAME of an environment variable" in stderr
    assert not leaked(stderr) and not leaked(stdout)


# -- key pools (issue 23): three keys, one revoked mid-run, /metrics served -----------------------


def pool_leaked(text: str | bytes) -> list[str]:
    """The pool keys whose value (or its distinctive tail) appears in ``text``."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return [env for env, value in POOL_VALUES.items() if value in text or value[-11:] in text]


def assert_no_pool_key_under(folder: Path) -> None:
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert any(p.parts[-2] == "trace" for p in files) and (folder / "manifest.json").exists()
    for p in files:
        assert not pool_leaked(p.read_bytes()), f"a key value found in {p}"


async def scrape_text(port: int) -> str:
    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            return resp.read().decode()

    return await asyncio.to_thread(get)


async def run_revoking(sim, args: list[str], port: int, after: int) -> tuple[int, str, str, str]:
    """``fair ARGS`` with the pool's keys in the environment; key b revoked (the simulator's admin
    route) once ``after`` requests came in; /metrics read after the revocation, mid-run."""
    run = asyncio.create_task(fair(*args, "--metrics-port", str(port), env=POOL_VALUES))
    while sim.stats["requests"] < after and not run.done():
        await asyncio.sleep(0.005)
    assert not run.done(), "the run ended before the revocation"
    await asyncio.to_thread(revoke, sim.base_url, "b")
    while sim.stats.by_key["b"]["http_401"] == 0 and not run.done():
        await asyncio.sleep(0.005)
    metrics = await scrape_text(port) if not run.done() else ""
    rc, stdout, stderr = await run
    return rc, stdout, stderr, metrics


def assert_pool_run_clean(rc: int, stdout: str, stderr: str, metrics: str, out: Path) -> None:
    assert rc == 0, stderr
    assert not pool_leaked(stdout) and not pool_leaked(stderr)
    assert metrics and not pool_leaked(metrics) and 'key="POOL_KEY_B"' in metrics
    assert_no_pool_key_under(out)
    assert "key POOL_KEY_B was refused" in stderr  # the retired key's VARIABLE is named...
    trace = b"".join(p.read_bytes() for p in (out / "trace").iterdir())
    assert b'"refused":["POOL_KEY_B"]' in trace  # ...in the trace too


async def test_no_pool_key_leaks_from_a_generate_run_with_a_key_revoked(tmp_path):
    inp = write_input(tmp_path / "in.jsonl", 200)
    out = tmp_path / "out"
    async with start_sim(pool_profile()) as sim:
        args = ["generate", "--endpoint", sim.base_url, "--model", "sim", "--input", str(inp),
                "--output", str(out), "--no-progress", "--concurrency", "4", *key_flags()]  # fmt: skip
        got = await run_revoking(sim, args, free_port(), after=40)
        assert sim.stats.by_key["b"]["ok"] > 0  # b served calls before it was revoked
    assert_pool_run_clean(*got, out)


async def test_no_pool_key_leaks_from_a_fair_run_with_a_key_revoked(tmp_path):
    from test_pipeline import TEACHERS, problems, profile

    probs = problems(12)
    pool = [{"env": env, "group": g} if g else {"env": env} for env, g in POOL_GROUPS.items()]
    async with start_sim(pool_profile(**profile(latency_ms=5).models), problems=probs) as sim:
        endpoint = {"base_url": sim.base_url, "max_attempts": 2, "timeout_s": 10, "keys": pool}
        cfg = {
            "run": {"seed": 3, "max_in_flight": 4},
            "dataset": {"name": "jsonl", "path": str(dataset(tmp_path, probs)), "task": "numeric"},
            "student": {"endpoint": "student", "attempts": 2, "temperature": 0.7},
            "teachers": {"endpoints": list(TEACHERS)},
            "endpoints": {name: {**endpoint, "model": name} for name in [*TEACHERS, "student"]},
        }
        job = tmp_path / "job.toml"
        job.write_text(tomli_w.dumps(cfg))
        out = tmp_path / "run"
        args = ["run", str(job), "--run-dir", str(out), "--no-progress"]
        got = await run_revoking(sim, args, free_port(), after=30)
    assert_pool_run_clean(*got, out)


def dataset(folder: Path, probs: list) -> Path:
    """The problems as a jsonl dataset file."""
    path = folder / "data.jsonl"
    rows = [orjson.dumps({"id": p.id, "question": p.question, "answer": p.answer}) for p in probs]
    path.write_bytes(b"\n".join(rows) + b"\n")
    return path
