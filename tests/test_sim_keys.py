"""The simulator's key pools (issue 23): keys and organisations, unknown and revoked keys on every
wire, hidden per-key and per-organisation limits, per-organisation prompt caches, batches owned
by an organisation and the per-key counters of ``/stats``, over loopback HTTP to a real simulator
(the official SDKs where they fit, urllib otherwise)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

import anthropic
import openai
import pytest
from google import genai
from google.genai import errors as gerrors
from google.genai import types as gtypes

from fairdistill.engine.errors import ConfigError
from fairdistill.engine.sim.profiles import load_profile, profile_from_dict
from fairdistill.engine.sim.server import SimThread

A, B, C = "sk-sim-test-a-0123456789", "sk-sim-test-b-0123456789", "sk-sim-test-c-0123456789"
LONG = "Always show your work, step by step. " * 30  # a prefix worth caching
USER = [{"role": "user", "content": "What is 2 + 2?"}]


def profile(keys: dict | None = None, groups: dict | None = None, **models) -> dict:
    """Keys a and b in org-ab, c its own organisation; echo models (``m`` when none are named)."""
    keys = keys or {"a": {"group": "org-ab"}, "b": {"group": "org-ab"}, "c": {}}
    values = {"a": A, "b": B, "c": C}
    return {
        "name": "keys-test",
        "default_model": next(iter(models or {"m": 0})),
        "models": models or {"m": {"content": "echo", "prompt_cache": True}},
        "keys": {label: {"value": values[label], **spec} for label, spec in keys.items()},
        "groups": groups or {},
    }


@dataclass
class Reply:
    status_code: int
    headers: dict[str, str]
    text: str

    def json(self):
        return json.loads(self.text)


def http(method: str, url: str, body: dict | None = None, headers: dict | None = None) -> Reply:
    """One plain HTTP call (the simulator's admin routes, and wires where no SDK fits)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        url, data, {"Content-Type": "application/json", **(headers or {})}, method=method
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return Reply(r.status, {k.lower(): v for k, v in r.headers.items()}, r.read().decode())
    except urllib.error.HTTPError as exc:
        return Reply(exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read().decode())


def sim_of(data: dict) -> SimThread:
    return SimThread(profile_from_dict(data, source="test"))


def chat(sim: SimThread, key: str | None, model: str = "m", messages: list | None = None) -> Reply:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return http(
        "POST", f"{sim.base_url}/chat/completions", {"model": model, "messages": messages or USER}, headers
    )


def stats(sim: SimThread) -> dict:
    return http("GET", f"{sim.url}/stats").json()


def oai(sim: SimThread, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=sim.base_url, api_key=key, max_retries=0, _strict_response_validation=True)


def claude(sim: SimThread, key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=sim.url, api_key=key, max_retries=0)


_GEMINI: dict[tuple[str, str], genai.Client] = {}


def gem(sim: SimThread, key: str) -> genai.Client:
    """A google-genai client (kept: a client closes its connections when it is collected)."""
    if (sim.url, key) not in _GEMINI:
        opts = gtypes.HttpOptions(
            base_url=sim.url, api_version="v1beta", retry_options=gtypes.HttpRetryOptions(attempts=1)
        )
        _GEMINI[sim.url, key] = genai.Client(api_key=key, http_options=opts)
    return _GEMINI[sim.url, key]


def until(fetch, done, timeout_s: float = 20.0):
    deadline = time.monotonic() + timeout_s
    while True:
        it = fetch()
        if done(it) or time.monotonic() > deadline:
            return it
        time.sleep(0.05)


# -- profiles ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"api_key": "sk-one"}, "api_key and [keys] are exclusive"),
        ({"keys": {"a": {"value": A}, "b": {"value": A}}}, "keys.b.value: the same value as keys.a"),
        ({"keys": {"a": {"value": A, "rpm": "fast"}}}, "keys.a: Expected `float | null`"),
        ({"keys": {"a": {"value": A, "rmp": 5}}}, "keys.a: Object contains unknown field `rmp`"),
        ({"keys": {"a": {"value": ""}}}, "keys.a.value: must not be empty"),
        ({"keys": {"a": {"value": A, "revoke_after_s": -1}}}, "keys.a.revoke_after_s: must be >= 0"),
        ({"groups": {"org-x": {"rpm": 5}}}, "groups.org-x: no key has group = 'org-x'"),
        ({"keys": {"a": {"value": A}, "b": {"value": B, "group": "a"}}}, "keys.b.group: 'a' is key a's own"),
    ],
)
def test_bad_key_tables_are_one_clear_error_naming_the_field(change, named):
    data = {**profile(), **change}
    with pytest.raises(ConfigError) as info:
        profile_from_dict(data, source="pool.toml")
    assert str(info.value).startswith("sim profile pool.toml: ") and named in str(info.value)
    assert A not in str(info.value) and A not in repr(load_profile("keys"))


def test_the_named_keys_profile_is_the_benchmarks_pool():
    p = load_profile("keys")
    assert {k: (v.group, v.rpm, v.limit_headers, v.limit_burst_s) for k, v in p.keys.items()} == {
        "a": ("org-ab", 1000, False, 1),
        "b": ("org-ab", 1000, False, 1),
        "c": (None, 1000, False, 1),
    }
    assert p.keys["a"].value == "sk-sim-key-a-000000000000"
    assert (p.groups["org-ab"].rpm, p.groups["org-ab"].limit_burst_s) == (1500, 1)
    (model,) = p.models.values()
    assert model.prompt_cache and model.cache_min_tokens == 0 and model.rpm is None
    with SimThread(p) as sim:
        assert chat(sim, "sk-sim-key-c-000000000000").status_code == 200
        assert stats(sim)["by_group"].keys() == {"org-ab", "c"}


# -- keys on every wire --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pool():
    data = profile(
        {"a": {"group": "org-ab"}, "b": {"group": "org-ab"}, "c": {}},
        m={"content": "echo", "prompt_cache": True},
        g={"content": "echo", "prompt_cache": True},
    )
    with sim_of(data) as sim:
        yield sim


def test_openai_wire_refuses_an_unknown_or_missing_key(pool):
    with pytest.raises(openai.AuthenticationError) as info:
        oai(pool, "sk-wrong").chat.completions.create(model="m", messages=USER)
    assert info.value.status_code == 401 and info.value.body["code"] == "invalid_api_key"
    assert chat(pool, None).status_code == 401
    for call in (
        lambda c: c.files.create(file=("x.jsonl", io.BytesIO(b"{}\n")), purpose="batch"),
        lambda c: c.batches.list(),
        lambda c: c.batches.retrieve("batch_sim000001"),
        lambda c: c.models.list(),
    ):
        with pytest.raises(openai.AuthenticationError):
            call(oai(pool, "sk-wrong"))
    assert oai(pool, A).chat.completions.create(model="m", messages=USER).choices[0].message.content


def test_anthropic_wire_refuses_an_unknown_key_in_its_shape(pool):
    for call in (
        lambda c: c.messages.create(model="m", max_tokens=50, messages=USER),
        lambda c: c.messages.batches.list(),
        lambda c: c.messages.batches.create(requests=[{"custom_id": "x", "params": {}}]),
    ):
        with pytest.raises(anthropic.AuthenticationError) as info:
            call(claude(pool, "sk-wrong"))
        assert info.value.body == {
            "type": "error",
            "error": {"type": "authentication_error", "message": "invalid x-api-key"},
        }
    reply = claude(pool, B).messages.create(model="m", max_tokens=50, messages=USER)
    assert reply.content[0].text.startswith("echo:")
    headers = {"Authorization": f"Bearer {C}", "anthropic-version": "2023-06-01"}  # SDK 2.x sends Bearer
    body = {"model": "m", "max_tokens": 20, "messages": USER}
    assert http("POST", f"{pool.url}/v1/messages", body, headers).status_code == 200


def test_gemini_wire_refuses_an_unknown_key_as_google_does(pool, tmp_path):
    with pytest.raises(gerrors.ClientError) as info:
        gem(pool, "sk-wrong").models.generate_content(model="g", contents="hi")
    assert info.value.code == 400 and "API_KEY_INVALID" in json.dumps(info.value.details)
    path = tmp_path / "in.jsonl"
    path.write_text("{}\n")
    with pytest.raises(gerrors.ClientError):
        gem(pool, "sk-wrong").files.upload(file=path, config={"mime_type": "application/jsonl"})
    with pytest.raises(gerrors.ClientError):
        list(gem(pool, "sk-wrong").batches.list())
    url = f"{pool.url}/v1beta/models/g:generateContent"
    body = {"contents": [{"parts": [{"text": "hi"}]}]}
    assert http("POST", url, body).status_code == 403  # no key at all: PERMISSION_DENIED
    assert http("POST", f"{url}?key={A}", body).status_code == 200  # ?key= as Google takes it
    assert gem(pool, C).models.generate_content(model="g", contents="hi").text.startswith("echo:")


# -- hidden limits -------------------------------------------------------------------------------


def test_key_and_group_limits_cap_a_burst_at_the_group_limit():
    """Keys a and b (60 rpm each) share org-ab (90 rpm): a burst of 60 + 60 gets 90 through, the
    refused ones with only ``Retry-After: 1``; c, its own organisation, is not held back."""
    window = {"limit_shape": "fixed_window"}
    keys = {"a": {"group": "org-ab", "rpm": 60, **window}, "b": {"group": "org-ab", "rpm": 60, **window},
            "c": {"rpm": 60, **window}}  # fmt: skip
    with sim_of(profile(keys, {"org-ab": {"rpm": 90, **window}})) as sim:
        a, b, c = ([chat(sim, key) for _ in range(n)] for key, n in ((A, 61), (B, 60), (C, 61)))
        ok = [sum(r.status_code == 200 for r in rs) for rs in (a, b, c)]
        assert ok == [60, 30, 60], ok
        refused = [r for r in a + b + c if r.status_code == 429]
        assert len(refused) == 32
        for r in refused:
            assert r.headers["retry-after"] == "1" and not any(h.startswith("x-ratelimit") for h in r.headers)
            assert r.json()["error"]["code"] == "rate_limit_exceeded"
        assert "organization org-ab" in b[-1].json()["error"]["message"]
        assert "key a" in a[-1].json()["error"]["message"]
        s = stats(sim)
        assert {k: (v["ok"], v["http_429"]) for k, v in s["by_key"].items()} == {
            "a": (60, 1), "b": (30, 30), "c": (60, 1)}  # fmt: skip
        assert s["by_group"]["org-ab"] == {"requests": 121, "ok": 90, "http_429": 31}


def test_a_refused_request_takes_nothing_from_the_limits_before_it():
    """Key a has 60; model m1 only 30. The 30 that m1 refuses took nothing from the key, so
    another 30 still pass on the unlimited m2 (a partial take would leave none)."""
    window = {"limit_shape": "fixed_window"}
    data = profile(
        {"a": {"rpm": 60, **window}},
        m1={"content": "echo", "rpm": 30, **window},
        m2={"content": "echo"},
    )
    with sim_of(data) as sim:
        first = [chat(sim, A, "m1").status_code for _ in range(60)]
        then = [chat(sim, A, "m2").status_code for _ in range(40)]
    assert first.count(200) == 30 and first.count(429) == 30
    assert then.count(200) == 30 and then.count(429) == 10


def test_a_key_that_shows_its_limit_sends_headers_and_the_other_wires_429_in_their_shape():
    keys = {"a": {"rpm": 2, "limit_shape": "fixed_window", "limit_headers": True},
            "b": {"rpm": 2, "limit_shape": "fixed_window"}}  # fmt: skip
    with sim_of(profile(keys)) as sim:
        first = chat(sim, A)
        assert first.headers["x-ratelimit-limit-requests"] == "2"
        assert first.headers["x-ratelimit-remaining-requests"] == "1"
        chat(sim, A)
        refused = chat(sim, A)
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) > 1
        assert refused.headers["x-ratelimit-remaining-requests"] == "0"
        for _ in range(2):
            claude(sim, B).messages.create(model="m", max_tokens=20, messages=USER)
        with pytest.raises(anthropic.RateLimitError) as info:
            claude(sim, B).messages.create(model="m", max_tokens=20, messages=USER)
        assert info.value.body["error"]["type"] == "rate_limit_error"
        assert info.value.response.headers["retry-after"] == "1"
        with pytest.raises(gerrors.ClientError) as ginfo:
            gem(sim, B).models.generate_content(model="m", contents="hi")
        assert ginfo.value.code == 429 and ginfo.value.status == "RESOURCE_EXHAUSTED"
        assert stats(sim)["by_key"]["b"]["http_429"] == 2


# -- revocation ----------------------------------------------------------------------------------


def test_a_key_is_revoked_after_a_time_and_after_a_number_of_requests():
    keys = {"a": {"revoke_after_s": 0.6}, "b": {"revoke_after_requests": 3}, "c": {}}
    with sim_of(profile(keys)) as sim:
        assert chat(sim, A).status_code == 200
        assert [chat(sim, B).status_code for _ in range(5)] == [200, 200, 200, 401, 401]
        time.sleep(0.7)
        gone = chat(sim, A)
        assert gone.status_code == 401 and gone.json()["error"]["code"] == "invalid_api_key"
        assert chat(sim, C).status_code == 200
        with pytest.raises(anthropic.AuthenticationError):
            claude(sim, A).messages.create(model="m", max_tokens=20, messages=USER)
        with pytest.raises(gerrors.ClientError) as info:
            gem(sim, B).models.generate_content(model="m", contents="hi")
        assert info.value.code == 400 and "API_KEY_INVALID" in json.dumps(info.value.details)
        with pytest.raises(openai.AuthenticationError):  # batches too
            oai(sim, A).batches.list()
        by_key = stats(sim)["by_key"]
        assert (by_key["a"]["ok"], by_key["a"]["http_401"]) == (1, 3)
        assert (by_key["b"]["ok"], by_key["b"]["http_401"]) == (3, 3)
        assert http("POST", f"{sim.url}/reset").status_code == 200  # restores and refills all
        assert chat(sim, A).status_code == 200 and chat(sim, B).status_code == 200


def test_admin_revokes_and_restores_a_key_by_its_label():
    with sim_of(profile()) as sim:
        assert chat(sim, A).status_code == 200
        r = http("POST", f"{sim.url}/sim/keys/a/revoke")
        assert r.status_code == 200 and r.json() == {"label": "a", "group": "org-ab", "revoked": True,
                                                      "requests": 1}  # fmt: skip
        assert chat(sim, A).status_code == 401 and chat(sim, B).status_code == 200
        assert http("POST", f"{sim.url}/sim/keys/a/restore").json()["revoked"] is False
        assert chat(sim, A).status_code == 200
        http("POST", f"{sim.url}/sim/keys/b/revoke")
        assert chat(sim, B).status_code == 401
        http("POST", f"{sim.url}/reset")
        assert chat(sim, B).status_code == 200
        assert http("POST", f"{sim.url}/sim/keys/zz/revoke").status_code == 404
        listing = http("GET", f"{sim.url}/sim/keys").text
        assert '"label":"c"' in listing and A not in listing


# -- per-organisation prompt caches --------------------------------------------------------------


def test_prompt_cache_is_per_organisation(pool):
    messages = [{"role": "system", "content": LONG + "cache test"}, *USER]

    def cached(key: str) -> int:
        r = oai(pool, key).chat.completions.create(model="m", messages=messages)
        return r.usage.prompt_tokens_details.cached_tokens

    first, again, same_org, other_org, other_again = cached(A), cached(A), cached(B), cached(C), cached(C)
    assert first == 0 and again > 0 and same_org == again
    assert other_org == 0 and other_again == again
    by_key = stats(pool)["by_key"]
    assert (
        by_key["c"]["cached_tokens"] >= again and by_key["a"]["prompt_tokens"] > by_key["a"]["cached_tokens"]
    )
    assert http("POST", f"{pool.url}/reset").status_code == 200  # /reset empties the per-org caches
    assert cached(B) == 0 and cached(A) == again


def test_anthropic_and_gemini_caches_are_per_organisation_too(pool):
    msgs = [{"role": "user", "content": LONG + "anthropic"}, {"role": "assistant", "content": "ok"}, *USER]
    kw = {"model": "m", "max_tokens": 50, "messages": msgs, "cache_control": {"type": "ephemeral"}}
    reads = [claude(pool, k).messages.create(**kw).usage.cache_read_input_tokens for k in (A, B, C)]
    assert reads[0] == 0 and reads[1] > 0 and reads[2] == 0
    cfg = gtypes.GenerateContentConfig(system_instruction=LONG + "gemini")
    hits = [
        gem(pool, k).models.generate_content(model="g", contents="hi", config=cfg).usage_metadata
        for k in (C, C, A)
    ]
    assert [bool(u.cached_content_token_count) for u in hits] == [False, True, False]


# -- batches belong to an organisation -----------------------------------------------------------


def test_openai_batches_and_files_are_404_to_another_organisation(pool):
    line = {"custom_id": "c0", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "m", "messages": USER}}  # fmt: skip
    f = oai(pool, A).files.create(file=("in.jsonl", io.BytesIO(json.dumps(line).encode())), purpose="batch")
    with pytest.raises(openai.NotFoundError):
        oai(pool, C).batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    b = oai(pool, A).batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    done = until(lambda: oai(pool, B).batches.retrieve(b.id), lambda x: x.status == "completed")
    assert done.status == "completed"  # b: the same organisation sees it
    assert oai(pool, B).files.content(done.output_file_id).content
    with pytest.raises(openai.NotFoundError):
        oai(pool, C).batches.retrieve(b.id)
    with pytest.raises(openai.NotFoundError):
        oai(pool, C).batches.cancel(b.id)
    with pytest.raises(openai.NotFoundError):
        oai(pool, C).files.content(done.output_file_id)
    assert b.id not in [x.id for x in oai(pool, C).batches.list()]
    assert b.id in [x.id for x in oai(pool, B).batches.list()]


def test_anthropic_and_gemini_batches_are_404_to_another_organisation(pool, tmp_path):
    params = {"model": "m", "max_tokens": 20, "messages": USER}
    mb = claude(pool, C).messages.batches.create(requests=[{"custom_id": "c0", "params": params}])
    with pytest.raises(anthropic.NotFoundError) as info:
        claude(pool, A).messages.batches.retrieve(mb.id)
    assert info.value.body["error"]["type"] == "not_found_error"
    ended = until(lambda: claude(pool, C).messages.batches.retrieve(mb.id), lambda x: x.ended_at)
    assert ended.request_counts.succeeded == 1
    assert mb.id not in [x.id for x in claude(pool, B).messages.batches.list()]
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"key": "k0", "request": {"contents": [{"parts": [{"text": "q"}]}]}}) + "\n")
    f = gem(pool, A).files.upload(file=path, config={"mime_type": "application/jsonl", "display_name": "in"})
    with pytest.raises(gerrors.ClientError) as ginfo:
        gem(pool, C).batches.create(model="g", src=f.name, config={"display_name": "x"})
    assert ginfo.value.code == 404
    job = gem(pool, B).batches.create(model="g", src=f.name, config={"display_name": "L1"})
    job = until(lambda: gem(pool, A).batches.get(name=job.name), lambda j: j.done)
    assert "SUCCEEDED" in str(job.state)
    with pytest.raises(gerrors.ClientError) as ginfo:
        gem(pool, C).batches.get(name=job.name)
    assert ginfo.value.code == 404
    with pytest.raises(gerrors.ClientError):
        gem(pool, C).files.download(file=job.dest.file_name)
    assert gem(pool, A).files.download(file=job.dest.file_name)


# -- stats ---------------------------------------------------------------------------------------


def test_stats_count_per_key_and_group_by_label_never_by_value():
    with sim_of(profile()) as sim:
        for key in (A, A, B, "sk-wrong"):
            chat(sim, key)
        assert sim.stats.by_key["a"]["ok"] == 2  # readable from Python
        raw = http("GET", f"{sim.url}/stats").text
        body = json.loads(raw)
        a = body["by_key"]["a"]
        assert a == {"requests": 2, "ok": 2, "http_429": 0, "http_401": 0, "cached_tokens": 0,
                     "prompt_tokens": a["prompt_tokens"]}  # fmt: skip
        assert a["prompt_tokens"] > 0 and body["by_key"]["c"]["requests"] == 0
        assert body["by_group"] == {"org-ab": {"requests": 3, "ok": 3, "http_429": 0},
                                    "c": {"requests": 0, "ok": 0, "http_429": 0}}  # fmt: skip
        assert body["http_401"] == 1
        assert not any(v in raw for v in (A, B, C))


def test_without_keys_stats_and_caches_are_as_before():
    data = {"models": {"m": {"content": "echo", "prompt_cache": True}}}
    messages = [{"role": "system", "content": LONG}, *USER]
    with sim_of(data) as sim:
        first, again = (
            chat(sim, None, messages=messages).json(),
            chat(sim, "anything", messages=messages).json(),
        )
        body = stats(sim)
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert body["by_key"] == {} and body["by_group"] == {} and body["ok"] == 2


def test_fair_sim_serves_the_keys_profile_without_printing_a_value(tmp_path):
    fair = os.path.join(os.path.dirname(sys.executable), "fair")
    proc = subprocess.Popen(
        [fair, "sim", "--profile", "keys", "--port", "0"],
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stderr.readline()
        url = line.split(" on ")[-1].strip()
        key = {"Authorization": "Bearer sk-sim-key-b-000000000000"}
        assert (
            http("POST", f"{url}/chat/completions", {"model": "sim", "messages": USER}, key).status_code
            == 200
        )
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0
    assert "keys a, b, c" in line and "sk-sim-key" not in line + out + err
