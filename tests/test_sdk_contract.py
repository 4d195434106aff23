"""The official SDKs as the contract of the wire (issue 21), over loopback to the simulator.

1. Every body the engine encodes (each provider, online and batch, with and without reasoning
   controls, n = 1 and n > 1) fits the SDK's request type, unknown keys refused
   (``sdk_types.problems`` over ``CompletionCreateParams`` / ``MessageCreateParams`` /
   ``BatchCreateParams``; google-genai's pydantic ``Content`` / ``GenerationConfig``, which
   forbid extra keys, for Gemini).
2. The simulator's own parameter sets stay inside the SDKs'.
3. Each SDK's client (strict response validation on) drives the simulator through chat and the
   whole batch flow; the simulator refuses what the provider refuses, naming the parameter.

Against newer SDKs: ``pip install -U openai anthropic google-genai && pytest tests/test_sdk_contract.py``.
"""

from __future__ import annotations

import io
import json
import time
import typing
import urllib.error
import urllib.request

import anthropic
import msgspec
import openai
import pytest
from anthropic.types import Message
from anthropic.types.message_create_params import MessageCreateParamsNonStreaming
from anthropic.types.messages import batch_create_params
from google import genai
from google.genai import types as gtypes
from openai.types.chat import ChatCompletion
from openai.types.chat.completion_create_params import CompletionCreateParamsNonStreaming
from sdk_types import problems

from fairdistill.engine.config import EndpointConfig
from fairdistill.engine.request.batch.anthropic import AnthropicBatchWire
from fairdistill.engine.request.batch.gemini import GeminiBatchWire
from fairdistill.engine.request.batch.openai import OpenAIBatchWire
from fairdistill.engine.request.providers import make_provider
from fairdistill.engine.sim import strict
from fairdistill.engine.sim.profiles import profile_from_dict
from fairdistill.engine.sim.server import SimThread
from fairdistill.engine.types import ChatRequest
from fairdistill.engine.types import Message as Msg

KEY = "sk-sim-contract-0123456789"

# -- 1. what the engine encodes --------------------------------------------------------------------

# (provider, model, [endpoints.X.reasoning]) the engine must encode for: plain and reasoning models
ENDPOINTS = [
    ("openai", "gpt-4.1-mini", None),
    ("openai", "gpt-5-mini", None),
    ("openai", "gpt-5-mini", {"effort": "high"}),
    ("openai", "o4-mini", {"effort": "low", "budget_tokens": 2048}),
    ("openai", "deepseek-r1", {"effort": "medium"}),  # an OpenAI-compatible (vLLM) server
    ("anthropic", "claude-haiku-4-5", None),
    ("anthropic", "claude-opus-4-7", {"budget_tokens": 2048}),
    ("anthropic", "claude-sonnet-4-5", {"effort": "high", "include_thoughts": True}),
    ("gemini", "gemini-2.5-flash", None),
    ("gemini", "gemini-2.5-flash", {"budget_tokens": 1024, "include_thoughts": True}),
    ("gemini", "gemini-3-pro-preview", {"effort": "high"}),
    ("gemini", "gemini-2.5-pro", {"effort": "none"}),
]
SYSTEM = "You are a careful teacher."


def requests() -> list[ChatRequest]:
    """n = 1 and n > 1, with and without the optional sampling fields."""
    msgs = (Msg("system", SYSTEM), Msg("user", "What is 7 * 6?"))
    return [
        ChatRequest(messages=msgs, max_tokens=512),
        ChatRequest(
            messages=msgs[1:], max_tokens=256, temperature=0.7, top_p=0.9, n=3, seed=7, stop=("###",)
        ),
    ]


def provider(name: str, model: str, reasoning: dict | None):
    cfg = {"provider": name, "base_url": "http://127.0.0.1:9/v1", "model": model}
    if reasoning is not None:
        cfg["reasoning"] = reasoning
    return make_provider(msgspec.convert(cfg, EndpointConfig))


GEMINI_TOP = {"contents", "systemInstruction", "generationConfig", "safetySettings", "tools", "toolConfig"}


def gemini_problems(body: dict) -> list[str]:
    """A generateContent body against google-genai's models (extra keys forbidden)."""
    out = [f"$.{k}: unknown key (not a GenerateContentRequest field)" for k in body if k not in GEMINI_TOP]
    checks = [(c, gtypes.Content, f"$.contents[{i}]") for i, c in enumerate(body.get("contents", []))]
    checks.append((body.get("generationConfig", {}), gtypes.GenerationConfig, "$.generationConfig"))
    if "systemInstruction" in body:
        checks.append((body["systemInstruction"], gtypes.Content, "$.systemInstruction"))
    for value, model, path in checks:
        try:
            model.model_validate(value)
        except Exception as exc:  # pydantic's ValidationError, reported as text
            out.append(f"{path}: {exc}")
    return out


def body_problems(name: str, body: dict) -> list[str]:
    if name == "openai":
        return problems(body, CompletionCreateParamsNonStreaming)
    if name == "anthropic":
        return problems(body, MessageCreateParamsNonStreaming)
    return gemini_problems(body)


@pytest.mark.parametrize(("name", "model", "reasoning"), ENDPOINTS)
def test_engine_online_bodies_fit_the_sdk_request_types(name, model, reasoning):
    p = provider(name, model, reasoning)
    for req in requests():
        body = json.loads(p.encode(req))
        assert body_problems(name, body) == [], (name, model, reasoning, body)
        if name == "gemini" and reasoning is not None:
            assert "thinkingConfig" in body["generationConfig"], body
        if name == "anthropic" and reasoning is not None and "thinking" in body:
            assert body["max_tokens"] > body["thinking"]["budget_tokens"] >= 1024, body


@pytest.mark.parametrize(("name", "model", "reasoning"), ENDPOINTS)
def test_engine_batch_inputs_fit_the_sdk_request_types(name, model, reasoning):
    p = provider(name, model, reasoning)
    items = [(f"r{i}", p.encode(req)) for i, req in enumerate(requests())]
    if name == "anthropic":
        doc = b'{"requests":[' + b",".join(AnthropicBatchWire.line(c, b) for c, b in items) + b"]}"
        assert problems(json.loads(doc), batch_create_params.BatchCreateParams) == []
        return
    wire = OpenAIBatchWire if name == "openai" else GeminiBatchWire
    for cid, body in items:
        line = json.loads(wire.line(cid, body))
        if name == "openai":
            assert (
                line.keys() == {"custom_id", "method", "url", "body"}
                and line["url"] == "/v1/chat/completions"
            )
            assert problems(line["body"], CompletionCreateParamsNonStreaming) == []
        else:
            assert line.keys() == {"key", "request"} and line["key"] == cid
            assert gemini_problems(line["request"]) == []


def test_the_checker_refuses_what_the_sdks_do_not_declare():
    """The oracle itself can fail: unknown keys, a missing required key, a wrong Literal."""
    msgs = [{"role": "user", "content": "hi"}]
    assert problems({"model": "m", "messages": msgs, "top_k": 5}, CompletionCreateParamsNonStreaming)
    assert problems({"model": "m", "messages": msgs, "temperature": 0.2, "max_tokens": 9},
                    MessageCreateParamsNonStreaming)  # fmt: skip
    assert problems({"model": "m", "messages": msgs}, MessageCreateParamsNonStreaming)
    thinking = {"model": "m", "messages": msgs, "max_tokens": 9, "thinking": {"type": "on"}}
    assert problems(thinking, MessageCreateParamsNonStreaming)
    assert gemini_problems({"contents": [{"role": "user", "parts": [{"text": "x"}]}],
                            "generationConfig": {"maxTokens": 5}})  # fmt: skip


# -- 2. the simulator's parameter sets stay inside the SDKs' -------------------------------------


def _aliases(model) -> set[str]:
    return {f.alias or n for n, f in model.model_fields.items()}


def test_the_simulator_accepts_no_parameter_the_sdks_lack():
    openai_keys = set(typing.get_type_hints(CompletionCreateParamsNonStreaming))
    anthropic_keys = set(typing.get_type_hints(MessageCreateParamsNonStreaming))
    assert openai_keys >= strict.OPENAI_PARAMS
    assert "top_k" not in strict.OPENAI_PARAMS
    assert anthropic_keys >= strict.ANTHROPIC_PARAMS
    assert not set(strict.ANTHROPIC_SAMPLING) & anthropic_keys, "the SDK took sampling back: revisit strict"
    assert _aliases(gtypes.GenerationConfig) >= strict.GEMINI_GENERATION
    assert _aliases(gtypes.ThinkingConfig) >= strict.GEMINI_THINKING


# -- 3. the SDK clients against the simulator ----------------------------------------------------

PROFILE = {
    "name": "sdk-contract",
    "api_key": KEY,
    "default_model": "plain",
    "models": {
        "plain": {"content": "echo"},
        "o-sim": {"content": "echo", "thinking": True, "sampling": False, "refuses": ["max_tokens"],
                  "prompt_cache": True},
        "claude-sim": {"content": "echo", "thinking": True, "sampling": False, "prompt_cache": True},
        "gemini-sim": {"content": "echo", "thinking": True, "prompt_cache": True},
        "r1-sim": {"content": "echo", "thinking": True, "reasoning_field": "reasoning_content",
                   "accepts": ["top_k"]},
    },
}  # fmt: skip
LONG = "Always show your work. " * 40  # a shared prefix long enough to be worth caching


@pytest.fixture(scope="module")
def sim():
    with SimThread(profile_from_dict(PROFILE)) as s:
        yield s


def until(fetch, done, timeout_s: float = 20.0):
    """Poll ``fetch()`` until ``done(it)``; the last value."""
    deadline = time.monotonic() + timeout_s
    while True:
        it = fetch()
        if done(it) or time.monotonic() > deadline:
            return it
        time.sleep(0.05)


# OpenAI


@pytest.fixture(scope="module")
def oai(sim):
    return openai.OpenAI(base_url=sim.base_url, api_key=KEY, max_retries=0, _strict_response_validation=True)


def test_openai_chat_parses_and_counts_reasoning_and_cached_tokens(oai):
    user = [{"role": "user", "content": "What is 2 + 2?"}]
    r = oai.chat.completions.create(
        model="plain", messages=user, n=2, temperature=0.5, max_completion_tokens=64
    )
    assert isinstance(r, ChatCompletion) and len(r.choices) == 2 and r.usage.completion_tokens > 0
    msgs = [{"role": "system", "content": LONG}, *user]
    first = oai.chat.completions.create(model="o-sim", messages=msgs, reasoning_effort="high")
    again = oai.chat.completions.create(model="o-sim", messages=msgs, max_completion_tokens=2000)
    for r in (first, again):
        thought = r.usage.completion_tokens_details.reasoning_tokens
        assert 0 < thought < r.usage.completion_tokens, r.usage
        assert "reasoning_content" not in (r.choices[0].message.model_extra or {})  # OpenAI shows none
    assert (
        first.usage.completion_tokens_details.reasoning_tokens
        > again.usage.completion_tokens_details.reasoning_tokens
    )
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert 0 < again.usage.prompt_tokens_details.cached_tokens < again.usage.prompt_tokens


def test_openai_vllm_like_server_returns_reasoning_apart_from_the_answer(oai):
    r = oai.chat.completions.create(model="r1-sim", messages=[{"role": "user", "content": "why?"}],
                                    extra_body={"top_k": 20})  # fmt: skip
    thought = r.choices[0].message.model_extra["reasoning_content"]
    assert thought and thought not in r.choices[0].message.content
    assert r.usage.completion_tokens_details.reasoning_tokens == (len(thought) + 3) // 4


@pytest.mark.parametrize(
    ("model", "kwargs", "param"),
    [
        ("plain", {"extra_body": {"top_k": 5}}, "top_k"),
        ("plain", {"extra_body": {"bogus": 1}}, "bogus"),
        ("plain", {"reasoning_effort": "low"}, "reasoning_effort"),
        ("o-sim", {"temperature": 0.2}, "temperature"),
        ("o-sim", {"top_p": 0.5}, "top_p"),
        ("o-sim", {"max_tokens": 50}, "max_tokens"),
    ],
)
def test_openai_refusals_name_the_parameter(oai, model, kwargs, param):
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], **kwargs)
    assert info.value.status_code == 400 and info.value.body["param"] == param
    assert param in info.value.body["message"]


def test_openai_batch_flow_with_the_sdk(oai):
    good = {"model": "plain", "messages": [{"role": "user", "content": "q"}], "max_completion_tokens": 20}
    lines = [
        {"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions", "body": good}
        for i in range(3)
    ]
    lines.append(
        {"custom_id": "bad", "method": "POST", "url": "/v1/chat/completions", "body": {**good, "top_k": 3}}
    )
    data = b"".join(json.dumps(x).encode() + b"\n" for x in lines)
    f = oai.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")
    assert f.status == "processed" and f.bytes == len(data)
    b = oai.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                           metadata={"fair_batch": "L1"})  # fmt: skip
    b = until(lambda: oai.batches.retrieve(b.id), lambda x: x.status == "completed")
    assert b.status == "completed" and b.request_counts.completed == 3 and b.request_counts.failed == 1
    out = [json.loads(x) for x in oai.files.content(b.output_file_id).content.splitlines()]
    assert sorted(x["custom_id"] for x in out) == ["c0", "c1", "c2"]
    for x in out:
        ChatCompletion.model_validate(x["response"]["body"])
    (err,) = [json.loads(x) for x in oai.files.content(b.error_file_id).content.splitlines()]
    assert err["response"]["status_code"] == 400 and err["response"]["body"]["error"]["param"] == "top_k"


# Anthropic


@pytest.fixture(scope="module")
def claude(sim):
    return anthropic.Anthropic(base_url=sim.url, api_key=KEY, max_retries=0, _strict_response_validation=True)


def test_anthropic_messages_with_thinking_blocks_bearer_auth_and_cache(claude):
    m = claude.messages.create(model="plain", max_tokens=100, system="be brief",
                               messages=[{"role": "user", "content": "hello"}])  # fmt: skip
    assert isinstance(m, Message) and [b.type for b in m.content] == ["text"]
    msgs = [{"role": "user", "content": LONG}, {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "now the question"}]  # fmt: skip
    kw = {"model": "claude-sim", "max_tokens": 3000, "messages": msgs, "cache_control": {"type": "ephemeral"},
          "thinking": {"type": "enabled", "budget_tokens": 1024}}  # fmt: skip
    first, again = claude.messages.create(**kw), claude.messages.create(**kw)
    assert [b.type for b in first.content] == ["thinking", "text"]
    assert first.content[0].thinking and first.content[0].thinking not in first.content[1].text
    assert first.usage.output_tokens > (len(first.content[1].text) + 3) // 4  # thinking billed as output
    assert first.usage.cache_creation_input_tokens > 0 and first.usage.cache_read_input_tokens == 0
    assert again.usage.cache_read_input_tokens == first.usage.cache_creation_input_tokens
    assert again.usage.input_tokens < first.usage.cache_creation_input_tokens


@pytest.mark.parametrize(
    ("model", "kwargs", "param"),
    [
        ("plain", {"extra_body": {"temperature": 0.5}}, "temperature"),  # removed in 2026-10-21
        ("plain", {"extra_body": {"top_k": 5}}, "top_k"),
        ("plain", {"extra_body": {"n": 2}}, "n"),
        ("plain", {"thinking": {"type": "enabled", "budget_tokens": 2048}}, "thinking"),  # not a thinker
        (
            "claude-sim",
            {"extra_body": {"temperature": 0.5}, "extra_headers": {"anthropic-version": "2023-06-01"}},
            "temperature",
        ),
        ("claude-sim", {"thinking": {"type": "enabled", "budget_tokens": 512}}, "budget_tokens"),
        ("claude-sim", {"thinking": {"type": "enabled", "budget_tokens": 4096}}, "max_tokens"),
    ],
)
def test_anthropic_refusals_name_the_parameter(claude, model, kwargs, param):
    with pytest.raises(anthropic.BadRequestError) as info:
        claude.messages.create(
            model=model, max_tokens=2000, messages=[{"role": "user", "content": "x"}], **kwargs
        )
    assert info.value.body["type"] == "error" and param in info.value.body["error"]["message"]


def test_anthropic_legacy_version_still_takes_temperature_on_a_sampling_model(claude):
    m = claude.messages.create(model="plain", max_tokens=50, messages=[{"role": "user", "content": "x"}],
                               extra_body={"temperature": 0.5},
                               extra_headers={"anthropic-version": "2023-06-01"})  # fmt: skip
    assert m.content[0].text


def test_anthropic_batch_flow_with_the_sdk(claude):
    params = {"model": "claude-sim", "max_tokens": 2000, "messages": [{"role": "user", "content": "q"}],
              "thinking": {"type": "enabled", "budget_tokens": 1024}}  # fmt: skip
    reqs = [{"custom_id": f"c{i}", "params": params} for i in range(3)]
    reqs.append({"custom_id": "bad", "params": {**params, "temperature": 0.3}})
    b = claude.messages.batches.create(requests=reqs)
    assert b.processing_status == "in_progress" and b.request_counts.processing == 4
    b = until(lambda: claude.messages.batches.retrieve(b.id), lambda x: x.processing_status == "ended")
    assert b.request_counts.succeeded == 3 and b.request_counts.errored == 1
    results = {r.custom_id: r.result for r in claude.messages.batches.results(b.id)}
    assert results.keys() == {"c0", "c1", "c2", "bad"}
    for cid in ("c0", "c1", "c2"):
        assert results[cid].type == "succeeded"
        assert [x.type for x in results[cid].message.content] == ["thinking", "text"]
    assert results["bad"].type == "errored" and "temperature" in results["bad"].error.error.message


# Gemini


@pytest.fixture(scope="module")
def gemini(sim):
    # v1beta: where batch mode and the Files API live (google-genai 3.x defaults to v1)
    retry = gtypes.HttpRetryOptions(attempts=1)
    opts = gtypes.HttpOptions(base_url=sim.url, api_version="v1beta", retry_options=retry)
    return genai.Client(api_key=KEY, http_options=opts)


def test_gemini_generate_content_with_thoughts_and_usage(gemini):
    cfg = gtypes.GenerateContentConfig(
        system_instruction=LONG, max_output_tokens=800, temperature=0.3, candidate_count=2,
        thinking_config=gtypes.ThinkingConfig(include_thoughts=True, thinking_budget=64),
    )  # fmt: skip
    first = gemini.models.generate_content(model="gemini-sim", contents="What is 3 + 4?", config=cfg)
    again = gemini.models.generate_content(model="gemini-sim", contents="What is 3 + 4?", config=cfg)
    u = first.usage_metadata
    assert u.thoughts_token_count == 2 * 64 and u.candidates_token_count > 0
    assert u.total_token_count == u.prompt_token_count + u.candidates_token_count + u.thoughts_token_count
    parts = first.candidates[0].content.parts
    assert parts[0].thought is True and not parts[-1].thought and len(first.candidates) == 2
    assert parts[0].text not in first.text
    assert not u.cached_content_token_count and again.usage_metadata.cached_content_token_count > 0
    plain = gtypes.GenerateContentConfig(max_output_tokens=800)
    hidden = gemini.models.generate_content(model="gemini-sim", contents="x", config=plain)
    assert hidden.usage_metadata.thoughts_token_count > 0
    assert not any(p.thought for p in hidden.candidates[0].content.parts)


def _post_gemini(sim, body: dict) -> tuple[int, dict]:
    url = f"{sim.url}/v1beta/models/gemini-sim:generateContent"
    headers = {"x-goog-api-key": KEY, "Content-Type": "application/json"}
    req = urllib.request.Request(url, json.dumps(body).encode(), headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.parametrize(
    ("config", "name"),
    [
        ({"maxTokens": 5}, "maxTokens"),
        ({"temprature": 0.1}, "temprature"),
        ({"thinkingConfig": {"thinkingBudget": 10, "thinkingLevel": "LOW"}}, "thinking"),
        ({"thinkingConfig": {"includeThought": True}}, "includeThought"),
    ],
)
def test_gemini_refuses_misspelled_generation_config(sim, config, name):
    status, body = _post_gemini(sim, {"contents": [{"parts": [{"text": "x"}]}], "generationConfig": config})
    assert (
        status == 400 and body["error"]["status"] == "INVALID_ARGUMENT" and name in body["error"]["message"]
    )


def test_gemini_takes_snake_case_names_as_google_does(sim):
    status, body = _post_gemini(sim, {"contents": [{"parts": [{"text": "x"}]}],
                                      "generation_config": {"max_output_tokens": 400}})  # fmt: skip
    assert status == 200, body
    gtypes.GenerateContentResponse.model_validate(body)


def test_gemini_batch_flow_with_the_sdk(gemini, tmp_path):
    req = {
        "contents": [{"role": "user", "parts": [{"text": "q"}]}],
        "generationConfig": {"maxOutputTokens": 400},
    }
    lines = [{"key": f"k{i}", "request": req} for i in range(3)]
    lines.append({"key": "bad", "request": {**req, "generationConfig": {"maxTokens": 4}}})
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"".join(json.dumps(x).encode() + b"\n" for x in lines))
    f = gemini.files.upload(file=path, config=gtypes.UploadFileConfig(mime_type="application/jsonl",
                                                                      display_name="in"))  # fmt: skip
    assert f.name.startswith("files/") and f.size_bytes == path.stat().st_size
    job = gemini.batches.create(model="gemini-sim", src=f.name, config={"display_name": "L1"})
    job = until(lambda: gemini.batches.get(name=job.name), lambda j: j.done)
    assert "SUCCEEDED" in str(job.state), job
    data = gemini.files.download(file=job.dest.file_name)
    out = {x["key"]: x for x in map(json.loads, data.splitlines())}
    assert out.keys() == {"k0", "k1", "k2", "bad"}
    for k in ("k0", "k1", "k2"):
        gtypes.GenerateContentResponse.model_validate(out[k]["response"])
    assert out["bad"]["error"]["code"] == 3 and "maxTokens" in out["bad"]["error"]["message"]
