"""Prometheus metrics scraped over HTTP while a run is going, parsed with prometheus_client."""

from __future__ import annotations

import asyncio
import socket
import urllib.request

import pytest
from fakeserver import FakeServer, write_input
from prometheus_client.parser import text_string_to_metric_families

import fairdistill.engine.request.client as client_mod
from fairdistill.engine.config import EndpointConfig
from fairdistill.engine.generate import generate


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr(client_mod, "BACKOFF_BASE_S", 0.01)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[str, dict[tuple, float]]:
    """name -> {(sorted label items): value}, every sample of every family."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def one(metrics: dict, name: str, **labels: str) -> float:
    return metrics[name][tuple(sorted(labels.items()))]


async def test_generate_serves_metrics_during_the_run(tmp_path):
    n = 300
    inp = write_input(tmp_path / "in.jsonl", n)
    port = free_port()
    script = ["status:503", ("status", 429, {"error": {"message": "slow"}}, {"retry-after-ms": "1"})]
    async with FakeServer(latency_s=0.02, script=script) as srv:
        cfg = EndpointConfig(base_url=srv.url, model="m", concurrency=8, price_in=1.0, price_out=2.0)
        run = asyncio.create_task(generate(inp, tmp_path / "out", cfg, progress=False, metrics_port=port))
        while len(srv.seen) < 60:
            await asyncio.sleep(0.01)
        during = await asyncio.to_thread(scrape, port)
        assert not run.done()
        summary = await run
    ok = one(during, "fair_requests_total", endpoint="default", outcome="ok")
    assert 0 < ok < n  # scraped mid-run
    assert one(during, "fair_http_429_total", endpoint="default") == 1
    assert one(during, "fair_retries_total", endpoint="default") == 1
    assert 0 <= one(during, "fair_in_flight", endpoint="default") <= 8
    assert one(during, "fair_effective_rpm", endpoint="default") > 0
    assert one(during, "fair_effective_tpm", endpoint="default") > 0
    count = one(during, "fair_request_latency_seconds_count", endpoint="default")
    assert count >= ok  # the histogram is read a moment after the counter
    assert one(during, "fair_request_latency_seconds_bucket", endpoint="default", le="0.005") == 0  # 20 ms
    assert one(during, "fair_request_latency_seconds_bucket", endpoint="default", le="+Inf") == count
    prompt = one(during, "fair_tokens_total", endpoint="default", kind="prompt")
    assert prompt > 0
    assert one(during, "fair_cost_usd_total", endpoint="default") >= prompt / 1e6
    assert summary["ok"] == n
    with pytest.raises(OSError):  # the server stops with the run
        scrape(port)


async def test_a_busy_metrics_port_is_a_config_error(tmp_path):
    from fairdistill.engine.errors import ConfigError

    inp = write_input(tmp_path / "in.jsonl", 3)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        async with FakeServer() as srv:
            with pytest.raises(ConfigError, match=f"--metrics-port {port}"):
                await generate(
                    inp,
                    tmp_path / "out",
                    EndpointConfig(base_url=srv.url, model="m"),
                    progress=False,
                    metrics_port=port,
                )


def scrape_url(url: str) -> dict[str, dict[tuple, float]]:
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    return scrape(port)


async def test_a_fair_job_exports_its_stages(tmp_path):
    from test_pipeline import config, problems, profile

    from fairdistill.engine.fair.pipeline import Job
    from fairdistill.engine.sim import start_sim

    probs = problems(40)
    port = free_port()
    async with start_sim(profile(latency_ms=20), problems=probs) as sim:
        job = Job(config(sim.base_url, run={"max_in_flight": 4}), tmp_path, progress=False, metrics_port=port)
        run = asyncio.create_task(job.run(iter(probs)))
        while job.finished < 8:
            await asyncio.sleep(0.01)
        during = await asyncio.to_thread(scrape, port)
        summary = await run
    done = one(during, "fair_stage_total", stage="problems", outcome="done")
    assert 8 <= done < len(probs)
    assert one(during, "fair_stage_total", stage="student", outcome="attempts") >= 2 * done
    rationales = {
        dict(k)["outcome"]: v for k, v in during["fair_stage_total"].items() if ("stage", "rationales") in k
    }
    assert {"accepted", "rejected_gold", "rejected_review"} <= set(rationales) and sum(
        rationales.values()
    ) > 0
    assert set(during["fair_requests_total"]) >= {
        (("endpoint", n), ("outcome", "ok")) for n in ("student", "t-good")
    }
    assert summary["status"] == "done"


def test_serve_student_serves_metrics(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from test_serve import build_tiny

    from fairdistill.trainer.serve import StudentServer

    tiny = build_tiny(tmp_path / "tiny")
    with StudentServer(model=str(tiny), max_batch=4) as srv:
        base = srv.base_url.removesuffix("/v1")
        before = scrape_url(base)
        body = b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}'
        req = urllib.request.Request(
            f"{srv.base_url}/chat/completions", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert resp.status == 200
        after = scrape_url(base)
    assert one(before, "fair_student_requests_total") == 0
    assert one(after, "fair_student_requests_total") == 1
    assert one(after, "fair_student_generated_tokens_total") >= 1
    assert one(after, "fair_student_waiting") == 0
