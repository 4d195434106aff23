"""The API key never reaches stderr, stdout, records, trace, manifest, cache or any repr,
even when a careless server echoes it back in its error messages."""

from __future__ import annotations

import pytest
from fakeserver import FakeServer, fair, gen_args, write_input

import fairdistill.engine.request.client as client_mod
from fairdistill.engine.config import EndpointConfig
from fairdistill.engine.errors import AuthError, RequestError
from fairdistill.engine.request.client import Engine
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
