"""The rich progress display: plain lines off a terminal, a bar on one, fed by request events."""

from __future__ import annotations

import asyncio
import io
import time

from fakeserver import FakeServer

from fairdistill.engine.config import EndpointConfig
from fairdistill.engine.progress import Progress
from fairdistill.engine.request.client import Engine
from fairdistill.engine.types import ChatRequest, user


async def answer_all(bar: Progress, n: int) -> None:
    script = [("status", 429, {"error": {"message": "slow"}}, {"retry-after-ms": "1"})]
    async with FakeServer(latency_s=0.01, script=script) as srv:
        cfg = EndpointConfig(base_url=srv.url, model="m", price_in=1.0, price_out=1.0)
        async with Engine({"a": cfg}) as engine:
            engine.observe(bar)
            with bar:
                for i in range(n):
                    await engine.complete("a", ChatRequest(messages=user(f"q{i}")))
                    bar.done += 1
                    await asyncio.sleep(0.01)


async def test_off_a_terminal_it_writes_plain_lines_with_the_request_counters():
    out = io.StringIO()
    bar = Progress(total=12, label="responses", stream=out, tty=False, interval_s=0.05)
    bar.resumed = 3
    await answer_all(bar, 9)
    lines = out.getvalue().splitlines()
    assert len(lines) >= 3  # periodic lines, then the last one
    assert all("\r" not in ln and "\x1b" not in ln for ln in lines)  # no terminal control codes
    last = lines[-1]
    assert last.startswith("responses 12/12 | ")
    assert "429 1" in last and "retries 0" in last and "calls " in last
    assert "$0.0000" not in last and "$0.0" in last  # tokens x $1/M: a few hundredths of a cent


async def test_on_a_terminal_it_draws_a_rich_bar():
    out = io.StringIO()
    bar = Progress(total=9, label="responses", stream=out, tty=True, rate_hz=20, width=200)
    await answer_all(bar, 9)
    text = out.getvalue()
    assert "\x1b[" in text  # drawn with terminal codes
    assert "responses" in text and "9/9" in text and "429 1" in text
    assert "━" in text  # rich's bar


def test_the_trainer_uses_it_without_an_event_loop():
    out = io.StringIO()
    with Progress(total=5, label="steps", requests=False, stream=out, tty=False, interval_s=0.02) as bar:
        for step in range(5):
            bar.fields["loss"] = f"{1.0 / (step + 1):.3f}"
            bar.advance()
            time.sleep(0.01)
    last = out.getvalue().splitlines()[-1]
    assert last.startswith("steps 5/5 | ") and "loss 0.200" in last
    assert "calls" not in last and "$" not in last


def test_disabled_writes_nothing():
    out = io.StringIO()
    with Progress(total=3, stream=out, tty=False, enabled=False, interval_s=0.01) as bar:
        bar.advance(3)
        time.sleep(0.03)
    assert out.getvalue() == ""
