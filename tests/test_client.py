"""The request path over real loopback HTTP: retries, deadlines, error mapping, fan-out, trace."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from executors import UrllibExecutor
from fakeserver import FakeServer

import fairdistill.engine.request.client as client_mod
from fairdistill.engine.config import EndpointConfig
from fairdistill.engine.errors import AuthError, ConfigError, ReplyError, RequestError
from fairdistill.engine.request.admission import Admission
from fairdistill.engine.request.client import Engine
from fairdistill.engine.request.events import Observer
from fairdistill.engine.rundir.store import iter_raw
from fairdistill.engine.types import ChatRequest, user


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr(client_mod, "BACKOFF_BASE_S", 0.01)


def ep(srv: FakeServer, **kw) -> dict[str, EndpointConfig]:
    return {"a": EndpointConfig(base_url=srv.url, model="m", **kw)}


REQ = ChatRequest(messages=user("hello"))


async def test_a_5xx_burst_is_retried_then_answered():
    burst = ["status:503", "status:500", "status:502"]
    async with FakeServer(script=burst) as srv, Engine(ep(srv)) as engine:
        done = await engine.complete("a", REQ)
    assert done.text == "echo: hello"
    assert done.attempts == 4
    assert engine.stats["a"].retries == 3 and engine.stats["a"].ok == 1
    assert len(srv.seen) == 4


async def test_a_hung_request_hits_its_deadline_and_is_retried():
    async with FakeServer(script=["hang"]) as srv, Engine(ep(srv, timeout_s=0.3)) as engine:
        done = await engine.complete("a", REQ)
    assert done.text == "echo: hello" and done.attempts == 2
    assert engine.stats["a"].timeouts == 1
    assert 0.3 <= done.latency_s < 2.0


async def test_a_reset_connection_is_retried():
    async with FakeServer(script=["reset", "reset"]) as srv, Engine(ep(srv)) as engine:
        done = await engine.complete("a", REQ)
    assert done.text == "echo: hello" and done.attempts == 3


async def test_retries_are_bounded_by_max_attempts():
    async with FakeServer(rule=lambda s: "status:503") as srv, Engine(ep(srv, max_attempts=3)) as engine:
        with pytest.raises(RequestError) as err:
            await engine.complete("a", REQ)
    assert len(srv.seen) == 3
    assert "gave up after 3 attempts" in str(err.value) and "HTTP 503" in str(err.value)
    assert err.value.status == 503 and engine.stats["a"].errors == 1


@pytest.mark.parametrize(("action", "words"), [("malformed", "unusable reply"), ("empty", "no choices")])
async def test_an_unusable_body_fails_the_record_with_a_clear_message(action, words):
    async with FakeServer(rule=lambda s: action) as srv, Engine(ep(srv, max_attempts=2)) as engine:
        with pytest.raises(ReplyError) as err:
            await engine.complete("a", REQ)
    assert words in str(err.value) and "'a'" in str(err.value)
    assert len(srv.seen) == 2  # retried once (a flaky gateway), then given up


@pytest.mark.parametrize("status", [400, 404, 422])
async def test_a_4xx_fails_the_record_with_the_server_message_and_no_retry(status):
    body = {"error": {"message": "max_tokens is too large: 999999", "type": "invalid_request_error"}}
    async with FakeServer(rule=lambda s: ("status", status, body, {})) as srv, Engine(ep(srv)) as engine:
        with pytest.raises(RequestError) as err:
            await engine.complete("a", REQ)
    assert f"HTTP {status}" in str(err.value) and "max_tokens is too large" in str(err.value)
    assert err.value.status == status and len(srv.seen) == 1


@pytest.mark.parametrize("status", [401, 403])
async def test_refused_credentials_abort_and_later_calls_fail_fast(status):
    async with FakeServer(rule=lambda s: f"status:{status}") as srv, Engine(ep(srv)) as engine:
        with pytest.raises(AuthError, match=f"HTTP {status}"):
            await engine.complete("a", REQ)
        with pytest.raises(AuthError):
            await engine.complete("a", ChatRequest(messages=user("another")))
    assert len(srv.seen) == 1


async def test_missing_key_env_is_a_config_error(monkeypatch):
    monkeypatch.delenv("FAIR_TEST_NO_SUCH_KEY", raising=False)
    engine = Engine(
        {
            "a": EndpointConfig(
                base_url="http://127.0.0.1:9/v1", model="m", api_key_env="FAIR_TEST_NO_SUCH_KEY"
            )
        }
    )
    with pytest.raises(ConfigError, match="FAIR_TEST_NO_SUCH_KEY"):
        async with engine:
            pass


async def test_unknown_endpoint_is_a_config_error():
    async with FakeServer() as srv, Engine(ep(srv)) as engine:
        with pytest.raises(ConfigError, match="unknown endpoint"):
            await engine.complete("nope", REQ)


async def test_cost_is_usage_times_price():
    async with FakeServer() as srv, Engine(ep(srv, price_in=2.0, price_out=10.0)) as engine:
        done = await engine.complete("a", REQ)
    u = done.usage
    assert done.cost_usd == pytest.approx((u.prompt_tokens * 2.0 + u.completion_tokens * 10.0) / 1e6)
    assert engine.stats["a"].cost_usd == pytest.approx(done.cost_usd)
    assert engine.stats["a"].prompt_tokens == u.prompt_tokens


async def test_anthropic_has_no_n_so_calls_fan_out_and_merge():
    async with FakeServer() as srv, Engine(ep(srv, provider="anthropic")) as engine:
        done = await engine.complete("a", ChatRequest(messages=user("hi", system="sys"), n=3))
    assert [c.text for c in done.choices] == ["echo: hi"] * 3
    assert done.usage.prompt_tokens == 21 and done.attempts == 3
    assert len(srv.seen) == 3 and all(s.path == "/v1/messages" for s in srv.seen)
    assert all(s.body["system"] == "sys" and "n" not in s.body for s in srv.seen)


async def test_openai_and_gemini_send_n_in_one_call():
    async with (
        FakeServer() as srv,
        Engine({**ep(srv), "g": EndpointConfig(provider="gemini", base_url=srv.url, model="gm")}) as engine,
    ):
        o = await engine.complete("a", ChatRequest(messages=user("hi"), n=2, seed=5))
        g = await engine.complete("g", ChatRequest(messages=user("hi"), n=2))
    assert len(o.choices) == 2 and len(g.choices) == 2
    assert srv.seen[0].body["n"] == 2 and srv.seen[0].body["seed"] == 5
    assert srv.seen[1].path == "/v1/models/gm:generateContent"
    assert srv.seen[1].body["generationConfig"]["candidateCount"] == 2


async def test_trace_has_one_line_per_call(tmp_path):
    async with (
        FakeServer(script=["status:503"]) as srv,
        Engine(
            ep(srv, price_in=1.0), cache_path=tmp_path / "c.sqlite", trace_dir=tmp_path / "trace"
        ) as engine,
    ):
        await engine.complete("a", REQ)
        await engine.complete("a", REQ)  # cache hit
        srv.rule = lambda s: ("status", 400, {"error": {"message": "bad"}}, {})
        with pytest.raises(RequestError):
            await engine.complete("a", ChatRequest(messages=user("other")))
    lines = list(iter_raw(tmp_path, "trace"))
    assert len(lines) == 3
    first, hit, failed = lines
    assert first["endpoint"] == "a" and first["model"] == "m" and first["status"] == 200
    assert first["attempts"] == 2 and first["prompt_tokens"] > 0 and first["cost_usd"] > 0
    assert hit["cache_hit"] is True and hit.get("cost_usd", 0) == 0
    assert failed["error"] == "RequestError" and failed["status"] == 400
    raw = b"".join(p.read_bytes() for p in (tmp_path / "trace").iterdir())
    assert b"hello" not in raw  # no prompts, no bodies, no headers
    assert all(
        set(orjson.loads(x))
        <= {
            "ts",
            "endpoint",
            "model",
            "latency_s",
            "prompt_tokens",
            "completion_tokens",
            "reasoning_tokens",
            "cached_tokens",
            "cache_write_tokens",
            "cost_usd",
            "attempts",
            "http_429",
            "cache_hit",
            "status",
            "error",
        }
        for x in raw.splitlines()
    )


async def test_stats_and_snapshot_are_plain_counters():
    async with FakeServer() as srv, Engine(ep(srv, concurrency=4)) as engine:
        for _ in range(3):
            await engine.complete("a", REQ)
        snap = engine.snapshot()
    assert snap["a"]["requests"] == 3 and snap["a"]["ok"] == 3 and snap["a"]["in_flight"] == 0
    assert snap["a"]["calls"] == 3


# -- request events and seams ------------------------------------------------------------------


class Recorder(Observer):
    """Logs every event it is told, with the call's counters at that moment."""

    def __init__(self) -> None:
        self.log: list[tuple] = []

    def requested(self, call):
        self.log.append(("requested", call.endpoint))

    def cached(self, call, done):
        self.log.append(("cached", call.endpoint))

    def admitted(self, call):
        self.log.append(("admitted", call.attempts))

    def sent(self, call):
        self.log.append(("sent", call.attempts))

    def answered(self, call):
        self.log.append(("answered", call.status))

    def throttled(self, call):
        self.log.append(("throttled", call.http_429))

    def retried(self, call):
        self.log.append(("retried", call.attempts))

    def completed(self, call, done):
        self.log.append(("completed", call.attempts, call.http_429, done.text))

    def failed(self, call, error):
        self.log.append(("failed", type(error).__name__, call.status))


async def test_an_attempt_emits_its_events_in_order(tmp_path):
    rec = Recorder()
    script = ["status:503", ("status", 429, {"error": {"message": "slow"}}, {"retry-after-ms": "1"})]
    async with (
        FakeServer(script=script) as srv,
        Engine(ep(srv), cache_path=tmp_path / "c.sqlite", observers=(rec,)) as engine,
    ):
        await engine.complete("a", REQ)
        await engine.complete("a", REQ)  # from the cache
        srv.rule = lambda s: ("status", 400, {"error": {"message": "bad"}}, {})
        with pytest.raises(RequestError):
            await engine.complete("a", ChatRequest(messages=user("other")))
    assert rec.log == [
        ("requested", "a"),
        *[("admitted", 1), ("sent", 1), ("answered", 503)],
        ("retried", 1),
        *[("admitted", 2), ("sent", 2), ("throttled", 1), ("answered", 429)],
        *[("admitted", 2), ("sent", 2), ("answered", 200)],
        ("completed", 2, 1, "echo: hello"),
        ("requested", "a"),
        ("cached", "a"),
        ("requested", "a"),
        *[("admitted", 1), ("sent", 1), ("answered", 400)],
        ("failed", "RequestError", 400),
    ]


async def test_a_cancelled_call_gives_its_slot_back_and_is_answered_once():
    rec = Recorder()
    async with FakeServer(script=["hang"]) as srv, Engine(ep(srv, concurrency=1), observers=(rec,)) as engine:
        task = asyncio.create_task(engine.complete("a", REQ))
        while len(srv.seen) < 1:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert engine.stats["a"].in_flight == 0
        done = await asyncio.wait_for(engine.complete("a", REQ), 5)  # the one slot is free again
    assert done.text == "echo: hello"
    assert [e for e in rec.log if e[0] == "answered"] == [("answered", 0), ("answered", 200)]


async def test_injected_executor_and_shared_admission_replace_the_defaults(tmp_path):
    """A different HTTP client (urllib in threads) and ONE admission shared by two endpoints (the
    shape of a shared limiter): the engine and its accounting are unchanged, the cap is shared."""
    executor = UrllibExecutor()
    shared = Admission(concurrency=2)
    async with FakeServer(latency_s=0.05) as srv:
        cfgs = {n: EndpointConfig(base_url=srv.url, model=n, concurrency=16) for n in ("a", "b")}
        async with Engine(
            cfgs, admissions={"a": shared, "b": shared}, executor=executor, trace_dir=tmp_path / "trace"
        ) as engine:
            done = await asyncio.gather(
                *(engine.complete("ab"[i % 2], ChatRequest(messages=user(f"q{i}"))) for i in range(20))
            )
            assert engine.lanes["a"].admission is engine.lanes["b"].admission is shared
    assert [d.text for d in done] == [f"echo: q{i}" for i in range(20)]
    assert executor.sent == len(srv.seen) == 20
    assert executor.peak <= 2  # one cap of 2 across both endpoints, not 16 each
    assert engine.stats["a"].ok == engine.stats["b"].ok == 10
    assert len(list(iter_raw(tmp_path, "trace"))) == 20


async def test_injected_executor_keeps_retry_and_error_mapping():
    executor = UrllibExecutor()
    async with FakeServer(script=["status:503"]) as srv, Engine(ep(srv), executor=executor) as engine:
        done = await engine.complete("a", REQ)
        srv.rule = lambda s: ("status", 404, {"error": {"message": "no such model"}}, {})
        with pytest.raises(RequestError, match="HTTP 404: no such model"):
            await engine.complete("a", ChatRequest(messages=user("x")))
    assert done.attempts == 2 and engine.stats["a"].retries == 1 and executor.sent == 3


def test_admissions_for_unknown_endpoints_are_a_config_error():
    with pytest.raises(ConfigError, match="nope"):
        Engine(
            {"a": EndpointConfig(base_url="http://127.0.0.1:9/v1", model="m")},
            admissions={"nope": Admission(1)},
        )


def test_a_killed_runs_trace_shard_is_sealed_and_the_next_run_opens_its_own(tmp_path):
    """Trace shards go through the run store's shard writer: ``.partial`` while written, a torn
    last line cut and the shard sealed when the next run opens the folder."""
    import os

    from fairdistill.engine.request.trace import Trace, TraceEvent

    event = TraceEvent(ts=1.0, endpoint="a", model="m", latency_s=0.1, status=200)
    killed = Trace(tmp_path / "trace")
    killed.write(event)
    killed.flush()
    (partial,) = (tmp_path / "trace").glob("*.jsonl.partial")
    with open(partial, "ab") as f:
        f.write(b'{"ts": 2.0, "endpo')  # the kill landed mid-line
    os.close(killed._shards.fd)  # what the kill does to the file descriptor

    again = Trace(tmp_path / "trace")
    again.write(event)
    again.close()
    assert sorted(p.name for p in (tmp_path / "trace").iterdir()) == [
        "shard-00000.jsonl",
        "shard-00001.jsonl",
    ]
    assert [line["ts"] for line in iter_raw(tmp_path, "trace")] == [1.0, 1.0]
