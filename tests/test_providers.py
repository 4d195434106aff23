"""Wire protocols: request bodies, reply decoding, error bodies, key masking, header parsing."""

from __future__ import annotations

import email.utils
import time

import msgspec
import orjson
import pytest

from fairdistill.engine.config import EndpointConfig
from fairdistill.engine.errors import ReplyError
from fairdistill.engine.request.admission import parse_duration, parse_retry_after
from fairdistill.engine.request.providers import error_message, make_provider, redact
from fairdistill.engine.types import ChatRequest, Message, user

KEY = "sk-test-SECRET123"


def provider(kind: str):
    return make_provider(EndpointConfig(provider=kind, base_url="http://h/v1/", model="m-1"))


def test_openai_body_carries_sampling_n_and_seed():
    p = provider("openai")
    body = orjson.loads(
        p.encode(ChatRequest(messages=user("q", system="s"), max_tokens=9, n=3, seed=7, stop=("\n",)))
    )
    assert p.url == "http://h/v1/chat/completions"
    assert body == {
        "model": "m-1",
        "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
        "max_completion_tokens": 9,  # max_tokens is deprecated
        "temperature": 0.0,
        "n": 3,
        "seed": 7,
        "stop": ["\n"],
    }
    assert p.headers(KEY)["Authorization"] == f"Bearer {KEY}"
    assert "Authorization" not in p.headers(None)


def test_openai_decode_normalises_choices_and_usage():
    raw = orjson.dumps(
        {
            "model": "m-1-2024",
            "choices": [
                {"message": {"role": "assistant", "content": "a"}, "finish_reason": "stop"},
                {"message": {"role": "assistant", "content": None}, "finish_reason": "length"},
            ],
            "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
        }
    )
    done = provider("openai").decode(raw)
    assert [c.text for c in done.choices] == ["a", ""]
    assert [c.finish_reason for c in done.choices] == ["stop", "length"]
    assert (done.usage.prompt_tokens, done.usage.completion_tokens, done.model) == (5, 2, "m-1-2024")


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b'{"choices": [{"message": <html>', "unusable reply"),
        (b'{"id": "x"}', "choices"),
        (b'{"choices": []}', "no choices"),
        (b'{"choices": null}', "choices"),
        (b"", "unusable reply"),
    ],
)
def test_openai_unusable_reply_is_a_reply_error_with_a_clear_message(raw, words):
    with pytest.raises(ReplyError) as err:
        provider("openai").decode(raw)
    assert words in str(err.value)
    assert "http://h/v1/chat/completions" in str(err.value)


def test_anthropic_moves_system_to_top_level_and_maps_stop_reasons():
    p = provider("anthropic")
    body = orjson.loads(p.encode(ChatRequest(messages=user("q", system="be brief"), stop=("END",), seed=3)))
    assert p.url == "http://h/v1/messages"
    assert body["system"] == "be brief"
    assert body["messages"] == [{"role": "user", "content": "q"}]
    assert body["max_tokens"] == 1024  # required by the API; a default when the request has none
    assert body["stop_sequences"] == ["END"]
    assert "seed" not in body and "n" not in body
    assert p.supports_n is False
    h = p.headers(KEY)
    assert h["x-api-key"] == KEY and h["anthropic-version"]
    raw = orjson.dumps(
        {
            "content": [{"type": "thinking", "thinking": "hm"}, {"type": "text", "text": "hi"}],
            "stop_reason": "max_tokens",
            "usage": {"input_tokens": 4, "output_tokens": 1},
        }
    )
    done = p.decode(raw)
    assert (done.text, done.choices[0].finish_reason, done.usage.prompt_tokens) == ("hi", "length", 4)
    with pytest.raises(ReplyError):
        p.decode(b'{"type": "message"}')


def test_gemini_key_in_header_never_in_url_and_candidates_decoded():
    p = provider("gemini")
    assert p.url == "http://h/v1/models/m-1:generateContent"
    assert "key=" not in p.url
    assert p.headers(KEY) == {"Content-Type": "application/json", "x-goog-api-key": KEY}
    msgs = (Message("system", "sys"), Message("user", "q"), Message("assistant", "a"), Message("user", "q2"))
    body = orjson.loads(p.encode(ChatRequest(messages=msgs, n=2, seed=1, max_tokens=5, top_p=0.9)))
    assert body["systemInstruction"] == {"parts": [{"text": "sys"}]}
    assert [c["role"] for c in body["contents"]] == ["user", "model", "user"]
    assert body["generationConfig"] == {
        "temperature": 0.0,
        "maxOutputTokens": 5,
        "topP": 0.9,
        "candidateCount": 2,
        "seed": 1,
    }
    raw = orjson.dumps(
        {
            "candidates": [
                {
                    "content": {"parts": [{"text": "x", "thought": True}, {"text": "y"}]},
                    "finishReason": "STOP",
                },
                {"content": {"parts": [{"text": "z"}]}, "finishReason": "SAFETY"},
            ],
            "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 2},
        }
    )
    done = p.decode(raw)
    assert [(c.text, c.finish_reason) for c in done.choices] == [("y", "stop"), ("z", "content_filter")]
    assert done.usage.completion_tokens == 2
    with pytest.raises(ReplyError, match="no candidates"):
        p.decode(b'{"candidates": []}')


@pytest.mark.parametrize(
    "body",
    [
        {"error": {"message": f"Incorrect API key provided: {KEY}", "type": "invalid_request_error"}},
        {"type": "error", "error": {"type": "authentication_error", "message": f"invalid x-api-key {KEY}"}},
        {"error": {"code": 400, "message": f"API key not valid: {KEY}", "status": "INVALID_ARGUMENT"}},
        {"error": f"bad key {KEY}"},
        {"detail": f"nope {KEY}"},
    ],
)
def test_error_message_reads_every_protocol_and_masks_the_key(body):
    text = error_message(orjson.dumps(body), KEY)
    assert text and KEY not in text and "SECRET123" not in text


def test_redact_masks_keys_we_do_not_hold_and_echoed_fragments():
    assert "SECRET123" not in redact(f"you sent Bearer {KEY}")
    assert "AIzaSyA1234567890abcdef" not in redact("key=AIzaSyA1234567890abcdef")
    assert "sk-other-key-999" not in redact("got sk-other-key-999")
    assert redact("plain text, nothing secret") == "plain text, nothing secret"
    assert error_message(b"<html>Bad Gateway</html>") == "<html>Bad Gateway</html>"
    assert error_message(b"") == "(empty body)"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1s", 1.0), ("6m0s", 360.0), ("20ms", 0.02), ("1h2m3.5s", 3723.5), ("0.5", 0.5), ("2", 2.0)],
)
def test_parse_duration_openai_style(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", None, "soon", "1x", "s1", "inf", "infs", "nan", "-5", "1e3", "5s-1s"])
def test_parse_duration_rejects_garbage(text):
    assert parse_duration(text) is None


def test_retry_after_seconds_or_http_date():
    assert parse_retry_after("3") == 3.0
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 28 <= parse_retry_after(when) <= 31
    assert parse_retry_after("whenever") is None


def test_provider_objects_hold_no_key():
    p = provider("openai")
    p.headers(KEY)
    assert KEY not in repr(p) and not any(KEY in str(getattr(p, s)) for s in p.__slots__)
    assert msgspec.json.encode(EndpointConfig(base_url="u", model="m", api_key_env="MY_KEY")).find(b"sk-") < 0


@pytest.mark.parametrize(
    "body",
    [
        orjson.dumps({"error": {"message": "\x1b[2Jgone\x07\r\nsecond line\u202e"}}),
        b"\x1b]0;title\x07 raw text\r\n\x00",
        b"x" * 10_000,
        b'{"error": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    ],
)
def test_error_message_is_one_short_safe_line(body):
    text = error_message(body)
    assert len(text) <= 303 and not any(c in text for c in "\x1b\x07\x00\r\n\u202e")


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after": "inf"}, {}),  # not a delay: ignored (the engine's backoff), never 600 s
        ({"retry-after": "-5"}, {}),
        ({"retry-after": "nan"}, {}),
        ({"retry-after": "1e308"}, {}),
        ({"retry-after": "9" * 400}, {"retry-after": "600.000"}),  # valid but huge: clamped
        ({"retry-after-ms": "1e20"}, {}),
        ({"retry-after-ms": "99999999999999999999"}, {"retry-after-ms": "600000.000"}),
        ({"x-ratelimit-remaining-requests": "0"}, {}),  # a count with no reset and no limit: no rate
        (
            {"x-ratelimit-remaining-requests": "5", "x-ratelimit-reset-requests": "99999h"},
            {"x-ratelimit-remaining-requests": "5", "x-ratelimit-reset-requests": "600.000"},
        ),
    ],
)
def test_server_durations_are_clamped_and_junk_dropped(headers, expected):
    assert provider("openai").limits(headers) == expected


@pytest.mark.parametrize(
    ("status", "body", "verdict", "later"),
    [
        (200, b"{}", "OK", False),
        (429, b"", "ADMISSION", True),
        (401, b"", "ABORT", False),
        (403, b"", "ABORT", False),
        (
            400,
            b'{"error": {"details": [{"reason": "API_KEY_INVALID"}]}}',
            "ABORT",
            False,
        ),
        (400, b'{"error": {"message": "prompt too long"}}', "FAIL", False),
        (404, b"", "FAIL", False),
        (408, b"", "RETRY", True),
        (500, b"", "RETRY", True),
        (529, b"", "RETRY", True),
        (599, b"", "RETRY", True),
    ],
)
def test_one_status_table_for_online_batch_and_admission(status, body, verdict, later):
    """The one table (``providers.status``): what the online engine, the Batch API items and
    control calls, and admission each make of a status."""
    from fairdistill.engine.request.admission import Released, released
    from fairdistill.engine.request.providers.status import Verdict, again_later, classify

    assert classify(status, body) is Verdict[verdict]
    assert again_later(status) is later  # a batch item / control call: a later batch or poll
    expected = {"OK": Released.OK, "ADMISSION": Released.THROTTLED}.get(verdict, Released.OTHER)
    assert released(status) is expected and released(0) is Released.NO_ANSWER
