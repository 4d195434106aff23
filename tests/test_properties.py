"""Property tests (hypothesis) for the parsers that face the outside world: the reply decoders
(one per provider), the rate-limit header sanitizer, the config loader and the input-line
readers. Hypothesis makes the hostile inputs; the property is always the same: a named error
or a valid result, never another exception.

``pytest tests/test_properties.py --hypothesis-show-statistics`` prints how many examples each
property ran.
"""

from __future__ import annotations

import json
import math
import urllib.parse
from pathlib import Path

import tomli_w
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fairdistill.engine.config import RunConfig, load_config
from fairdistill.engine.errors import ConfigError, InputError, ReplyError
from fairdistill.engine.fair.datasets import load_jsonl
from fairdistill.engine.generate import parse_line
from fairdistill.engine.request.providers import MAX_WAIT_S, sane_limits
from fairdistill.engine.request.providers.anthropic import AnthropicProvider
from fairdistill.engine.request.providers.gemini import GeminiProvider
from fairdistill.engine.request.providers.openai import OpenAIProvider
from fairdistill.engine.types import Completion

SETTINGS = settings(
    max_examples=400,
    deadline=None,  # 2 shared cores: wall time per example varies, correctness does not
    database=None,  # nothing written into the tree
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# JSON values with the usual hostile corners: unbounded ints, NaN/inf, odd strings, nesting.
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=2**62, max_value=2**80)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
)
json_values = st.recursive(
    scalars,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=20,
)


def maybe(value):
    """A field that is mostly the right shape, else any JSON value, or absent (``...``)."""
    return st.one_of(value, value, value, value, json_values, st.just(...))


def obj(**fields) -> st.SearchStrategy:
    """A dict whose fields follow ``fields`` (each ``maybe(...)``), absent ones left out."""
    return st.fixed_dictionaries(fields).map(lambda d: {k: v for k, v in d.items() if v is not ...})


def encode(value) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


def deep(n: int, open_: bytes = b"[", close: bytes = b"]") -> bytes:
    return open_ * n + close * n


def typed(value):
    """A field that is the right shape (edge values included) or absent."""
    return st.one_of(value, value, value, st.just(...))


def shapes(field) -> dict[str, st.SearchStrategy]:
    """Each provider's reply shape, every field drawn with ``field`` (``maybe`` or ``typed``)."""
    text = field(st.one_of(st.text(max_size=30), st.none()))
    count = field(st.one_of(st.integers(0, 10**6), st.integers(0, 10**6), st.integers(-(2**70), 2**70)))
    finish = field(
        st.sampled_from(["stop", "length", "content_filter", "end_turn", "STOP", "SAFETY", "x" * 100])
    )

    def some(elements: st.SearchStrategy) -> st.SearchStrategy:
        return st.lists(elements, min_size=1, max_size=3)

    parts = some(obj(text=text, thought=field(st.booleans())))
    return {
        "openai": obj(
            choices=field(some(obj(message=field(obj(content=text)), text=text, finish_reason=finish))),
            usage=field(obj(prompt_tokens=count, completion_tokens=count)),
            model=text,
        ),
        "anthropic": obj(
            content=field(
                some(obj(type=field(st.sampled_from(["text", "tool_use", "thinking"])), text=text))
            ),
            stop_reason=finish,
            usage=field(obj(input_tokens=count, output_tokens=count)),
            model=text,
        ),
        "gemini": obj(
            candidates=field(some(obj(content=field(obj(parts=field(parts))), finishReason=finish))),
            usageMetadata=field(obj(promptTokenCount=count, candidatesTokenCount=count)),
            modelVersion=text,
        ),
    }


NOISY, TYPED = shapes(maybe), shapes(typed)


def bodies(provider: str) -> st.SearchStrategy[bytes]:
    """Reply bodies: well-typed JSON with edge values, shaped JSON with any value anywhere, any
    JSON, any bytes, cut-off JSON, very deep JSON."""
    return st.one_of(
        TYPED[provider].map(encode),
        TYPED[provider].map(encode),
        NOISY[provider].map(encode),
        json_values.map(encode),
        st.binary(max_size=200),
        NOISY[provider].map(encode).flatmap(lambda b: st.integers(0, len(b)).map(lambda i: b[:i])),
        st.integers(1, 200_000).map(deep),
        st.integers(1, 100_000).map(lambda n: deep(n, b'{"a":', b"}").replace(b"}", b"1}", 1)),
    )


EMPTY_OK = {"length", "content_filter"}


def check_completion(done: Completion, body: bytes) -> None:
    """What a decoder may return: at least one choice, text that is a string (empty only when the
    server sent an explicit empty text, or with a stop reason that allows none), token counts as
    small non-negative ints."""
    assert isinstance(done, Completion) and done.choices
    for c in done.choices:
        assert isinstance(c.text, str)
        assert c.text or c.finish_reason in EMPTY_OK or b'""' in body, c
        assert c.finish_reason is None or (isinstance(c.finish_reason, str) and len(c.finish_reason) <= 64)
    for n in (done.usage.prompt_tokens, done.usage.completion_tokens):
        assert isinstance(n, int) and 0 <= n <= 2**40


PROVIDERS = {
    "openai": OpenAIProvider("http://h/v1", "m"),
    "anthropic": AnthropicProvider("http://h/v1", "m"),
    "gemini": GeminiProvider("http://h/v1", "m"),
}


def _decode_property(provider, body: bytes) -> None:
    try:
        done = provider.decode(body)
    except ReplyError as exc:
        assert str(exc) and "\n" not in str(exc)
        event("ReplyError")
        return
    check_completion(done, body)
    event("decoded")


@SETTINGS
@given(body=bodies("openai"))
def test_openai_decode_is_a_completion_or_a_reply_error(body):
    _decode_property(PROVIDERS["openai"], body)


@SETTINGS
@given(body=bodies("anthropic"))
def test_anthropic_decode_is_a_completion_or_a_reply_error(body):
    _decode_property(PROVIDERS["anthropic"], body)


@SETTINGS
@given(body=bodies("gemini"))
def test_gemini_decode_is_a_completion_or_a_reply_error(body):
    _decode_property(PROVIDERS["gemini"], body)


# -- rate-limit headers ---------------------------------------------------------------------------

HEADER_KEYS = [
    "retry-after",
    "retry-after-ms",
    "x-ratelimit-reset-requests",
    "x-ratelimit-reset-tokens",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-limit-requests",
    "x-ratelimit-limit-tokens",
    "anthropic-ratelimit-requests-remaining",
    "anthropic-ratelimit-requests-reset",
    "anthropic-ratelimit-tokens-remaining",
    "anthropic-ratelimit-tokens-reset",
]
header_values = st.one_of(
    st.text(max_size=40),
    st.floats().map(str),
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.sampled_from(
        [
            "inf",
            "-inf",
            "nan",
            "1e308",
            "9" * 400,
            "99999999h",
            "1h2m3s",
            "20ms",
            "Fri, 31 Dec 9999 23:59:59 GMT",
        ]
    ),
    st.datetimes().map(lambda d: d.isoformat() + "Z"),
)


@SETTINGS
@given(headers=st.dictionaries(st.sampled_from(HEADER_KEYS), header_values), max_wait=st.floats(0.001, 1e4))
def test_every_server_duration_is_clamped(headers, max_wait):
    for provider in (OpenAIProvider("http://h", "m", max_wait), AnthropicProvider("http://h", "m", max_wait)):
        out = provider.limits(headers)
        for key, value in out.items():
            n = float(value)
            assert math.isfinite(n) and n >= 0, (key, value)
            if key.startswith(("retry-after", "x-ratelimit-reset")):
                limit = max_wait * 1000 if key == "retry-after-ms" else max_wait
                assert n <= limit + 1e-3, (key, value)
            else:
                assert n <= 1e12


def test_the_default_ceiling_is_ten_minutes():
    # a valid but huge delay is clamped to it; `inf` is no delay at all: ignored (engine.request.durations)
    assert MAX_WAIT_S == 600
    assert sane_limits({"retry-after": "9" * 400}) == {"retry-after": f"{MAX_WAIT_S:.3f}"}
    assert sane_limits({"retry-after": "inf"}) == {}


# -- the config loader ----------------------------------------------------------------------------

toml_values = st.recursive(
    st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(min_size=1, max_size=8), c, max_size=3),
    max_leaves=8,
)
FIELDS = {
    "run": ["seed", "max_in_flight", "shard_records", "breaker_window", "breaker_rate", "max_cost_usd"],
    "dataset": ["name", "split", "limit", "offset", "task"],
    "student": ["endpoint", "attempts", "temperature", "max_tokens", "top_p", "server", "model"],
    "teachers": ["endpoints", "temperature", "max_tokens", "review_max_tokens"],
    "review": ["gold_check", "threshold", "min_valid", "aggregation", "early_stop"],
    "endpoints.a": [
        "provider",
        "base_url",
        "model",
        "price_in",
        "concurrency",
        "rpm",
        "timeout_s",
        "max_attempts",
        "headers",
        "mode",
    ],
}
near = st.one_of(  # values of the right type, around the edges of their ranges
    st.integers(-2, 600),
    st.floats(-1.0, 6.0),
    st.booleans(),
    st.sampled_from(
        ["openai", "gemini", "mean", "median", "reject", "off", "v1", "v9", "http://h/v1", "h:1", "a", "b"]
    ),
    st.lists(st.sampled_from(["a", "b", "c", "s", "zz"]), max_size=4),
    st.sampled_from(
        ["http://h:99999/v1", "http://h:65535/v1", "http://[::1]:8000/v1", "http://h:/v1", "batch"]
    ),
    st.integers(2**63 - 2, 2**64),  # seeds around the 64-bit edge
    st.dictionaries(st.sampled_from(["X-A", "X A", "x:y", ""]), st.text(max_size=6), max_size=2),
)
EDITS = st.lists(
    st.sampled_from(
        [(s, f) for s, fs in FIELDS.items() for f in fs] + [("", "prompts"), ("run", "typo")]
    ).flatmap(lambda sf: st.tuples(st.just(sf), st.one_of(near, near, toml_values))),
    max_size=4,
)


def base() -> dict:
    ep = {"base_url": "http://127.0.0.1:9/v1", "model": "m"}
    return {
        "student": {"endpoint": "s"},
        "teachers": {"endpoints": ["a", "b", "c"]},
        "endpoints": {"s": dict(ep), "a": dict(ep), "b": dict(ep), "c": dict(ep)},
    }


def check_config(cfg: RunConfig) -> None:
    """What a loaded config guarantees (the range checks and the cross-field rules)."""
    assert cfg.student.endpoint in cfg.endpoints and len(set(cfg.teachers.endpoints)) >= 2
    assert 1 <= cfg.review.threshold < 5 and 1 <= cfg.review.min_valid <= len(cfg.teachers.endpoints) - 1
    assert cfg.run.max_in_flight >= 1 and cfg.run.breaker_window >= 1 and 0 < cfg.run.breaker_rate <= 1
    assert cfg.student.attempts >= 1 and 0 <= cfg.student.temperature <= 2
    for ep in cfg.endpoints.values():
        assert ep.base_url.startswith(("http://", "https://")) and ep.model
        assert ep.concurrency >= 1 and ep.timeout_s > 0 and ep.max_attempts >= 1 and ep.price_in >= 0
        assert ep.rpm is None or ep.rpm > 0
        port = urllib.parse.urlsplit(ep.base_url).port  # raises on a port out of range
        assert port is None or 1 <= port <= 65_535
        for name, value in ep.headers.items():  # nothing aiohttp would refuse, no CR/LF injection
            assert name and not any(c in name for c in " :\r\n") and not any(c in value for c in "\r\n\x00")
    assert -(2**63) <= cfg.run.seed < 2**63


@settings(SETTINGS, max_examples=300)
@given(edits=EDITS)
def test_config_loads_valid_or_names_the_file(tmp_path_factory, edits):
    raw = base()
    for (section, field), value in edits:
        if section == "endpoints.a":
            table = raw["endpoints"]["a"]
        else:
            table = raw.setdefault(section, {}) if section else raw
        table[field] = value
    path = tmp_path_factory.mktemp("cfg") / "job.toml"
    try:
        path.write_text(tomli_w.dumps(raw))
    except (TypeError, ValueError):  # not representable in TOML: nothing to load
        return
    _load_property(path)


def _load_property(path: Path) -> None:
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        assert str(exc).startswith(str(path)) and "\n" not in str(exc)
        event("ConfigError")
        return
    check_config(cfg)
    event("loaded")


@settings(SETTINGS, max_examples=200)
@given(data=st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode)))
def test_any_bytes_as_a_config_file(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("cfg") / "job.toml"
    path.write_bytes(data)
    _load_property(path)


# -- input lines ----------------------------------------------------------------------------------


def line_shape(field) -> st.SearchStrategy:
    msgs = st.lists(
        obj(
            role=field(st.sampled_from(["system", "user", "assistant", "robot"])),
            content=field(st.text(max_size=20)),
        ),
        max_size=3,
    )
    ids = st.one_of(st.text(max_size=10), st.integers(), st.integers(-(2**70), 2**70))
    return obj(id=field(ids), messages=field(msgs), prompt=field(st.text(max_size=20)))


LINES = st.one_of(line_shape(typed), line_shape(maybe))


def lines(shaped: st.SearchStrategy) -> st.SearchStrategy[bytes]:
    return st.one_of(
        shaped.map(encode),
        json_values.map(encode),
        st.binary(max_size=200).filter(lambda b: b"\n" not in b),
        st.integers(1, 200_000).map(deep),
        shaped.map(encode).flatmap(
            lambda b: st.tuples(st.integers(0, max(0, len(b) - 1)), st.integers(128, 255)).map(
                lambda t: b[: t[0]] + bytes([t[1]]) + b[t[0] + 1 :]  # a byte that breaks UTF-8
            )
        ),
    )


@SETTINGS
@given(raw=lines(LINES))
def test_generate_input_line_is_a_request_or_an_input_error(raw):
    try:
        record_id, msgs = parse_line(raw, "in.jsonl:7")
    except InputError as exc:
        assert str(exc).startswith("in.jsonl:7: ") and "\n" not in str(exc)
        event("InputError")
        return
    event("parsed")
    assert isinstance(record_id, str) and record_id
    assert msgs and all(
        m.role in ("system", "user", "assistant") and isinstance(m.content, str) for m in msgs
    )


DATASET_LINES = st.one_of(
    *(
        obj(
            id=f(st.text(max_size=6)),
            question=f(st.text(max_size=20)),
            answer=f(st.sampled_from(["12", "3.5", "x"])),
        )
        for f in (typed, typed, maybe)
    )
)


@settings(SETTINGS, max_examples=200)
@given(rows=st.lists(lines(DATASET_LINES), min_size=1, max_size=5))
def test_dataset_lines_are_problems_or_named_input_errors(tmp_path_factory, rows):
    path = tmp_path_factory.mktemp("ds") / "data.jsonl"
    path.write_bytes(b"\n".join(rows) + b"\n")
    errors: list[InputError] = []
    problems = load_jsonl(path, task="numeric", errors=errors)
    assert len({p.id for p in problems}) == len(problems)
    for e in errors:
        where = str(e).split(": ", 1)[0]
        assert where.startswith(f"{path}:") and 1 <= int(where.rsplit(":", 1)[1]) <= len(rows), str(e)
    assert len(problems) + len(errors) == sum(1 for r in rows if r.strip())
    event(f"problems: {'some' if problems else 'none'}")
