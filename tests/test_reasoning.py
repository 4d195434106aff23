"""Today's teachers (issue 21, engine side): model-aware bodies, reasoning controls per wire, usage
and cost as billed, reasoning kept apart from the answer, a refused parameter dropped once and
the request sent again, a Gemini safety block failing its record without retries."""

from __future__ import annotations

import asyncio

import msgspec
import orjson
import pytest
from fakeserver import FakeServer, fair

import fairdistill.engine.request.client as client_mod
from fairdistill.engine.accepts import refused_param
from fairdistill.engine.config import EndpointConfig, ReasoningConfig, load_config
from fairdistill.engine.errors import Blocked, ConfigError, RequestError
from fairdistill.engine.request.client import Engine
from fairdistill.engine.request.providers import make_provider
from fairdistill.engine.rundir.schema import Msg, Sample
from fairdistill.engine.rundir.store import iter_raw
from fairdistill.engine.rundir.targets import reasoning_mode, with_targets
from fairdistill.engine.types import ChatRequest, user


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr(client_mod, "BACKOFF_BASE_S", 0.01)


def body_of(provider: str, model: str, request: ChatRequest | None = None, **cfg) -> dict:
    cfg = {"provider": provider, "base_url": "http://h/v1", "model": model, **cfg}
    p = make_provider(msgspec.convert(cfg, EndpointConfig))
    req = request or ChatRequest(messages=user("q"), max_tokens=100, temperature=0.7, top_p=0.9, seed=3)
    return orjson.loads(p.encode(req))


# -- 1. what each model accepts -------------------------------------------------------------------


def test_openai_reasoning_models_get_no_sampling_and_the_new_token_limit():
    for model in ("o4-mini", "o3", "gpt-5", "gpt-5.1-mini"):
        body = body_of("openai", model)
        assert "temperature" not in body and "top_p" not in body, model
        assert body["max_completion_tokens"] == 100 and "max_tokens" not in body
        assert body["seed"] == 3
    chat = body_of("openai", "gpt-4.1-mini")
    assert (chat["temperature"], chat["top_p"], chat["max_completion_tokens"]) == (0.7, 0.9, 100)
    assert "max_tokens" not in chat


def test_claude_gets_no_sampling_parameters_unless_the_endpoint_says_so():
    body = body_of("anthropic", "claude-sonnet-4-5")
    assert not {"temperature", "top_p", "top_k", "seed", "n"} & set(body)
    assert body["max_tokens"] == 100
    gateway = body_of("anthropic", "claude-sonnet-4-5", accepts={"temperature": True})
    assert gateway["temperature"] == 0.7 and "top_p" not in gateway


def test_gemini_takes_sampling_and_an_override_drops_it():
    config = body_of("gemini", "gemini-2.5-flash")["generationConfig"]
    assert (config["temperature"], config["topP"], config["seed"]) == (0.7, 0.9, 3)
    config = body_of("gemini", "gemini-2.5-flash", accepts={"temperature": False, "seed": False})[
        "generationConfig"
    ]
    assert "temperature" not in config and "seed" not in config and config["topP"] == 0.9


@pytest.mark.parametrize(
    ("provider", "model", "section", "field"),
    [
        ("anthropic", "claude-opus-4-7", "accepts = { n = true }", "accepts.n"),
        ("anthropic", "claude-opus-4-7", "accepts = { seed = true }", "accepts.seed"),
        (
            "gemini",
            "gemini-2.5-pro",
            'accepts = { token_limit = "max_completion_tokens" }',
            "accepts.token_limit",
        ),
        ("openai", "gpt-4.1", 'reasoning = { effort = "high" }', "reasoning"),
        ("anthropic", "claude-opus-4-7", "reasoning = { budget_tokens = 500 }", "reasoning.budget_tokens"),
        ("gemini", "gemini-3-pro", 'reasoning = { effort = "low", budget_tokens = 2048 }', "reasoning"),
        ("openai", "o3", 'reasoning = { effort = "extreme" }', "reasoning.effort"),
    ],
)
def test_a_config_asking_for_what_the_provider_never_accepts_names_the_field(
    tmp_path, provider, model, section, field
):
    path = tmp_path / "job.toml"
    path.write_text(
        f'[endpoints.t]\nprovider = "{provider}"\nbase_url = "http://h/v1"\nmodel = "{model}"\n{section}\n'
        '[endpoints.u]\nbase_url = "http://h/v1"\nmodel = "m"\n'
        '[student]\nendpoint = "u"\n[teachers]\nendpoints = ["t", "u"]\n'
    )
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert str(path) in message and "endpoints.t" in message and field in message
    assert "\n" not in message


async def test_fair_run_exits_2_with_one_line_for_an_impossible_endpoint(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text(
        '[endpoints.claude]\nprovider = "anthropic"\nbase_url = "http://127.0.0.1:9/v1"\n'
        'model = "claude-opus-4-7"\naccepts = { n = true }\n'
        '[endpoints.s]\nbase_url = "http://127.0.0.1:9/v1"\nmodel = "m"\n'
        '[student]\nendpoint = "s"\n[teachers]\nendpoints = ["claude", "s"]\n'
    )
    rc, _, err = await fair("run", str(path), "--run-dir", str(tmp_path / "run"))
    assert rc == 2, err
    assert "Traceback" not in err
    assert [ln for ln in err.splitlines() if "accepts.n" in ln and "job.toml" in ln], err


# -- 3. reasoning controls, one vocabulary per wire ---------------------------------------------------


def test_reasoning_controls_map_onto_each_wire():
    req = ChatRequest(messages=user("q"), max_tokens=500, temperature=0.2)
    o = body_of("openai", "o4-mini", req, reasoning={"effort": "high", "budget_tokens": 4000})
    assert o["reasoning_effort"] == "high" and o["max_completion_tokens"] == 4500
    a = body_of("anthropic", "claude-opus-4-7", req, reasoning={"budget_tokens": 2048})
    assert a["thinking"] == {"type": "enabled", "budget_tokens": 2048}
    assert a["max_tokens"] == 2548 and "temperature" not in a  # the answer keeps its 500 above the budget
    a = body_of("anthropic", "claude-opus-4-7", req, reasoning={"effort": "medium"})
    assert a["thinking"]["budget_tokens"] == 4096 and a["max_tokens"] == 4596
    assert "thinking" not in body_of("anthropic", "claude-opus-4-7", req, reasoning={"effort": "none"})
    g = body_of(
        "gemini", "gemini-2.5-flash", req, reasoning={"budget_tokens": 1024, "include_thoughts": True}
    )
    config = g["generationConfig"]
    assert config["thinkingConfig"] == {"thinkingBudget": 1024, "includeThoughts": True}
    assert config["maxOutputTokens"] == 1524
    g = body_of("gemini", "gemini-3-pro", req, reasoning={"effort": "low"})["generationConfig"]
    assert g["thinkingConfig"] == {"thinkingLevel": "LOW"}
    off = body_of("gemini", "gemini-2.5-flash", req, reasoning={"effort": "none"})["generationConfig"]
    assert off["thinkingConfig"] == {"thinkingBudget": 0}
    assert "thinkingConfig" not in body_of("gemini", "gemini-2.5-flash", req)["generationConfig"]


# -- 4. usage and cost as billed; 5. reasoning apart from the answer -------------------------------


def test_gemini_thinking_tokens_are_added_and_thoughts_kept_apart():
    p = make_provider(EndpointConfig(provider="gemini", base_url="http://h/v1", model="gemini-2.5-pro"))
    done = p.decode(
        orjson.dumps(
            {
                "candidates": [
                    {
                        "content": {
                            "parts": [{"text": "let me see", "thought": True}, {"text": "The answer is 4."}]
                        },
                        "finishReason": "STOP",
                    }
                ],
                "usageMetadata": {
                    "promptTokenCount": 50,
                    "candidatesTokenCount": 7,
                    "thoughtsTokenCount": 13,
                    "cachedContentTokenCount": 32,
                },
            }
        )
    )
    assert done.text == "The answer is 4." and done.choices[0].reasoning == "let me see"
    u = done.usage
    assert (u.prompt_tokens, u.completion_tokens, u.reasoning_tokens, u.cached_tokens) == (50, 20, 13, 32)


def test_openai_usage_details_and_vllm_reasoning_content():
    p = make_provider(EndpointConfig(base_url="http://h/v1", model="deepseek-ai/DeepSeek-R1"))
    done = p.decode(
        orjson.dumps(
            {
                "choices": [
                    {"message": {"content": "4", "reasoning_content": "2+2"}, "finish_reason": "stop"},
                    {"message": {"content": "four", "reasoning": "two and two"}, "finish_reason": "stop"},
                ],
                "usage": {
                    "prompt_tokens": 2000,
                    "completion_tokens": 300,
                    "prompt_tokens_details": {"cached_tokens": 1536},
                    "completion_tokens_details": {"reasoning_tokens": 256},
                },
            }
        )
    )
    assert [(c.text, c.reasoning) for c in done.choices] == [("4", "2+2"), ("four", "two and two")]
    u = done.usage
    assert (u.prompt_tokens, u.completion_tokens, u.reasoning_tokens, u.cached_tokens) == (
        2000,
        300,
        256,
        1536,
    )


def test_anthropic_cache_tokens_are_input_and_thinking_blocks_are_reasoning():
    p = make_provider(EndpointConfig(provider="anthropic", base_url="http://h/v1", model="claude-opus-4-7"))
    done = p.decode(
        orjson.dumps(
            {
                "content": [
                    {"type": "thinking", "thinking": "hmm", "signature": "sig"},
                    {"type": "text", "text": "yes"},
                ],
                "stop_reason": "end_turn",
                "usage": {
                    "input_tokens": 10,
                    "output_tokens": 40,
                    "cache_read_input_tokens": 1000,
                    "cache_creation_input_tokens": 200,
                },
            }
        )
    )
    assert done.text == "yes" and done.choices[0].reasoning == "hmm"
    u = done.usage
    assert (u.prompt_tokens, u.cached_tokens, u.cache_write_tokens, u.completion_tokens) == (
        1210,
        1000,
        200,
        40,
    )


def test_include_thoughts_false_keeps_no_reasoning_on_the_record():
    p = make_provider(
        EndpointConfig(
            provider="anthropic",
            base_url="http://h/v1",
            model="claude-opus-4-7",
            reasoning=ReasoningConfig(budget_tokens=1024, include_thoughts=False),
        )
    )
    raw = b'{"content": [{"type": "thinking", "thinking": "x"}, {"type": "text", "text": "y"}]}'
    assert p.decode(raw).choices[0].reasoning is None


async def test_cost_prices_cached_input_and_thinking_as_billed(tmp_path):
    """Gemini-shaped replies through the real engine: the thinking tokens are billed as output,
    cached input at price_cached_in; records (trace), stats and cost agree."""
    reply = {
        "candidates": [{"content": {"parts": [{"text": "ok"}]}, "finishReason": "STOP"}],
        "usageMetadata": {
            "promptTokenCount": 1000,
            "candidatesTokenCount": 10,
            "thoughtsTokenCount": 90,
            "cachedContentTokenCount": 800,
        },
    }
    cfg = {
        "g": EndpointConfig(
            provider="gemini",
            base_url="http://h/v1",
            model="gemini-2.5-pro",
            price_in=1.0,
            price_out=10.0,
            price_cached_in=0.25,
        )
    }
    async with FakeServer(rule=lambda s: ("status", 200, reply, {})) as srv:
        cfg["g"] = msgspec.structs.replace(cfg["g"], base_url=srv.url)
        async with Engine(cfg, trace_dir=tmp_path / "trace") as engine:
            done = await engine.complete("g", ChatRequest(messages=user("q")))
    expected = (200 * 1.0 + 800 * 0.25 + 100 * 10.0) / 1e6
    assert done.cost_usd == pytest.approx(expected)
    st = engine.stats["g"]
    assert (st.completion_tokens, st.reasoning_tokens, st.cached_tokens) == (100, 90, 800)
    (line,) = list(iter_raw(tmp_path, "trace"))
    assert (line["completion_tokens"], line["reasoning_tokens"], line["cached_tokens"]) == (100, 90, 800)
    assert line["cost_usd"] == pytest.approx(expected)


def test_samples_carry_reasoning_as_think_blocks_only_when_asked(tmp_path):
    s = Sample(
        id="p/sample/rationale/t",
        problem_id="p",
        task="rationale",
        messages=[Msg("user", "q")],
        response="The answer is 4.",
        teacher="t",
        reasoning="2 + 2 = 4",
    )
    assert s.target("drop") == "The answer is 4."
    assert s.target("think") == "<think>\n2 + 2 = 4\n</think>\n\nThe answer is 4."
    (tmp_path / "config.toml").write_text('[samples]\nreasoning = "think"\n')
    assert reasoning_mode(tmp_path) == "think"
    assert reasoning_mode(tmp_path / "missing") == "drop"
    (think,) = with_targets([s], "think")
    assert think.response.startswith("<think>") and s.response == "The answer is 4."


# -- 2. a 400 naming a parameter: dropped once, sent again ----------------------------------------


@pytest.mark.parametrize(
    ("provider", "body", "param"),
    [
        ("anthropic", {"type": "error", "error": {"type": "invalid_request_error",
                       "message": "`temperature` is deprecated for this model."}}, "temperature"),
        ("openai", {"error": {"message": "Unsupported parameter: 'max_tokens' is not supported with this "
                    "model. Use 'max_completion_tokens' instead.", "param": "max_tokens",
                    "code": "unsupported_parameter"}}, "max_tokens"),
        ("openai", {"error": {"message": "Unsupported value: 'temperature' does not support 0.2 with "
                    "this model.", "param": "temperature", "code": "unsupported_value"}}, "temperature"),
        ("gemini", {"error": {"code": 400, "message": "Invalid JSON payload received. Unknown name "
                    "\"topP\" at 'generation_config': Cannot find field.", "status": "INVALID_ARGUMENT"}},
         "top_p"),
        ("openai", {"error": {"message": "temperature must be at most 2", "param": "temperature"}}, None),
        ("anthropic", {"type": "error", "error": {"type": "invalid_request_error",
                       "message": "max_tokens: must be greater than thinking.budget_tokens"}}, None),
    ],
)  # fmt: skip
def test_refused_param_reads_each_providers_400(provider, body, param):
    assert refused_param(provider, orjson.dumps(body)) == param


async def test_a_refused_parameter_is_dropped_once_and_the_requests_sent_again(tmp_path, capfd):
    """A Claude model that answers 400 to `temperature` (an endpoint whose override sends it): 20
    concurrent requests, every one answered, the drop said once on stderr and in the trace."""
    refusal = {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "`temperature` is deprecated for this model."},
    }

    def rule(seen):
        return ("status", 400, refusal, {}) if "temperature" in seen.body else None

    async with FakeServer(rule=rule, latency_s=0.02) as srv:
        given = {"provider": "anthropic", "model": "claude-opus-4-7", "accepts": {"temperature": True}}
        cfg = msgspec.convert({**given, "base_url": srv.url}, EndpointConfig)
        async with Engine({"c": cfg}, trace_dir=tmp_path / "trace") as engine:
            done = await asyncio.gather(
                *(engine.complete("c", ChatRequest(messages=user(f"q{i}"))) for i in range(20))
            )
    assert [d.text for d in done] == [f"echo: q{i}" for i in range(20)]
    refused = srv.count(400)
    assert 1 <= refused <= 20 and len(srv.seen) == 20 + refused  # each request refused at most once
    assert all("temperature" not in s.body for s in srv.seen if s.status == 200)
    assert engine.stats["c"].errors == 0 and engine.stats["c"].retries == 0
    err = capfd.readouterr().err
    assert err.count("does not take `temperature`") == 1, err
    trace = list(iter_raw(tmp_path, "trace"))
    assert [t["dropped"] for t in trace if "dropped" in t] == [["temperature"]]
    assert all(t["status"] == 200 and t["attempts"] == 1 for t in trace)


async def test_a_400_about_something_else_still_fails_the_record():
    bad = {"error": {"message": "messages: too long", "type": "invalid_request_error"}}
    async with FakeServer(rule=lambda s: ("status", 400, bad, {})) as srv:
        cfg = {"a": EndpointConfig(base_url=srv.url, model="m")}
        async with Engine(cfg) as engine:
            with pytest.raises(RequestError, match="too long"):
                await engine.complete("a", ChatRequest(messages=user("q")))
    assert len(srv.seen) == 1


# -- 6. a prompt blocked by safety -------------------------------------------------------------------


async def test_a_gemini_safety_block_fails_its_record_saying_why_without_retries():
    blocked = {
        "promptFeedback": {"blockReason": "SAFETY", "blockReasonMessage": "harassment"},
        "usageMetadata": {"promptTokenCount": 9},
    }
    async with FakeServer(rule=lambda s: ("status", 200, blocked, {})) as srv:
        cfg = EndpointConfig(provider="gemini", base_url=srv.url, model="gemini-2.5-flash")
        async with Engine({"g": cfg}) as engine:
            with pytest.raises(Blocked) as err:
                await engine.complete("g", ChatRequest(messages=user("q")))
    assert "blocked the prompt (SAFETY): harassment" in str(err.value)
    assert "candidates" not in str(err.value)
    assert len(srv.seen) == 1 and engine.stats["g"].retries == 0


def test_fair_train_reads_think_targets_from_the_runs_config(tmp_path):
    pytest.importorskip("torch")
    from fairdistill.trainer.data import load_samples, write_run_dir

    s = Sample(
        id="p/sample/mistake/t/0",
        problem_id="p",
        task="mistake",
        messages=[Msg("user", "q")],
        response="You added instead of multiplying.",
        teacher="t",
        reasoning="the student wrote 2+3",
    )
    write_run_dir(tmp_path / "drop", [s])
    write_run_dir(tmp_path / "think", [s])
    (tmp_path / "think" / "config.toml").write_text('[samples]\nreasoning = "think"\n')
    (dropped,) = load_samples([tmp_path / "drop"])
    (thought,) = load_samples([tmp_path / "think"])
    assert dropped.response == s.response
    assert thought.response == "<think>\nthe student wrote 2+3\n</think>\n\nYou added instead of multiplying."


async def test_in_batch_mode_items_refused_for_a_parameter_go_again_without_it(tmp_path, capfd):
    """An OpenAI-wire model that refuses temperature, behind the Batch API: the first batch's items
    come back 400 naming it; they are re-queued without it (a new item each, not the refused one)
    and answered by a second batch. Nothing fails, the drop is said once."""
    from fairdistill.engine.config import BatchConfig
    from fairdistill.engine.request.batch.executor import BatchExecutor, Unmetered
    from fairdistill.engine.sim import ModelProfile, SimProfile
    from fairdistill.engine.sim.server import SimServer

    profile = SimProfile(name="strict", models={"sim": ModelProfile(sampling=False)})
    async with SimServer(profile) as sim:
        cfg = EndpointConfig(
            base_url=sim.base_url,
            model="sim",
            mode="batch",
            batch=BatchConfig(linger_s=0.05, poll_s=0.05),
            price_in=1.0,
            price_out=2.0,
        )
        seams = {"executor": BatchExecutor(tmp_path), "admissions": {"e": Unmetered()}}
        async with Engine({"e": cfg}, trace_dir=tmp_path / "trace", **seams) as engine:
            reqs = [ChatRequest(messages=user(f"q{i}"), max_tokens=20, temperature=0.5) for i in range(6)]
            async with asyncio.timeout(30):
                done = await asyncio.gather(*(engine.complete("e", r) for r in reqs))
        assert sim.stats["batches_created"] == 2
    assert all(d.text for d in done) and engine.stats["e"].errors == 0
    assert capfd.readouterr().err.count("does not take `temperature`") == 1
    trace = list(iter_raw(tmp_path, "trace"))
    assert len(trace) == 6 and all(t["status"] == 200 and t.get("batch") for t in trace)


async def test_changed_reasoning_controls_are_not_answered_from_the_cache(tmp_path):
    """The cache keys an endpoint's reasoning controls: effort "high" after "low" is a new answer."""
    async with FakeServer() as srv:
        for effort, sent in (("low", 1), ("low", 1), ("high", 2)):
            cfg = msgspec.convert(
                {"base_url": srv.url, "model": "o4-mini", "reasoning": {"effort": effort}}, EndpointConfig
            )
            async with Engine({"o": cfg}, cache_path=tmp_path / "cache.sqlite") as engine:
                await engine.complete("o", ChatRequest(messages=user("q")))
            assert len(srv.seen) == sent
    assert [s.body["reasoning_effort"] for s in srv.seen] == ["low", "high"]
