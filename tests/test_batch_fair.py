"""The FAIR job with its teachers on provider Batch APIs (OpenAI, Anthropic, Gemini wires) and the
student online: the same records as an all-online run, the teachers at half the cost."""

from __future__ import annotations

import pytest
from test_pipeline import TEACHERS, config, problems, profile, run

from fairdistill.engine.fair.report import render_markdown, summarize
from fairdistill.engine.rundir.store import iter_raw, iter_records, read_manifest
from fairdistill.engine.sim import start_sim

WIRES = {"t-good": "openai", "t-mid": "anthropic", "t-harsh": "gemini"}


def _base(sim, wire: str) -> str:
    return sim.base_url.removesuffix("/v1") + "/v1beta" if wire == "gemini" else sim.base_url


def _view(run_dir) -> dict:
    """The records a run produced, by id, without timings."""
    out = {}
    for kind in ("attempts", "rationales", "reviews", "samples"):
        for r in iter_records(run_dir, kind):
            out[(kind, r.id)] = r
    return out


async def test_teachers_in_batch_mode_give_the_online_records_at_half_the_teacher_cost(tmp_path):
    probs = problems(24)
    async with start_sim(profile(), problems=probs) as sim:
        online = config(sim.base_url, endpoints={})
        for name, wire in WIRES.items():
            online.endpoints[name].provider, online.endpoints[name].base_url = wire, _base(sim, wire)
        await run(online, tmp_path / "online", probs)
        sim.stats.reset()

        batch = config(sim.base_url)
        for name, wire in WIRES.items():
            ep = batch.endpoints[name]
            ep.provider, ep.mode, ep.base_url = wire, "batch", _base(sim, wire)
            ep.batch.linger_s, ep.batch.poll_s = 0.05, 0.05
        summary = await run(batch, tmp_path / "batch", probs)
        stats = dict(sim.stats)
    assert summary["status"] == "done"
    assert _view(tmp_path / "batch") == _view(tmp_path / "online")
    # only the student went online; each teacher request was billed once
    assert stats["batches_created"] > 0 and stats["batch_items"] == stats["batch_items_billed"]
    m_on, m_b = read_manifest(tmp_path / "online"), read_manifest(tmp_path / "batch")
    total_on = total_b = 0.0
    for name in TEACHERS:
        on, b = m_on["endpoints"][name], m_b["endpoints"][name]
        # the same requests, each paid once (identical ones waiting at once share one item)
        assert b["calls"] + b["cache_hits"] == on["calls"] + on["cache_hits"] > 0
        assert b["calls"] == on["calls"]
        at_online_price = (b["prompt_tokens"] * 1.0 + b["completion_tokens"] * 2.0) / 1e6
        assert abs(b["cost_usd"] - 0.5 * at_online_price) <= 1e-6
        total_on, total_b = total_on + on["cost_usd"], total_b + b["cost_usd"]
    assert 0.45 <= total_b / total_on <= 0.52
    assert m_b["endpoints"]["student"]["cost_usd"] == m_on["endpoints"]["student"]["cost_usd"]

    # the report: dollars per accepted sample per teacher and per stage, half price in batch mode
    c_on, c_b = (
        summarize(tmp_path / "online")["cost_per_sample"],
        summarize(tmp_path / "batch")["cost_per_sample"],
    )
    assert c_b["samples"] == c_on["samples"] > 0
    assert {"student", "rationale", "review"} <= set(c_b["stages"])
    assert c_b["stages"]["student"]["usd"] == pytest.approx(c_on["stages"]["student"]["usd"])
    for stage in ("rationale", "review"):
        assert c_b["stages"][stage]["usd"] == pytest.approx(0.5 * c_on["stages"][stage]["usd"], rel=1e-6)
    for name in TEACHERS:
        on, b = c_on["endpoints"][name], c_b["endpoints"][name]
        assert b["samples"] == on["samples"]
        if on["samples"]:
            assert b["usd_per_sample"] == pytest.approx(0.5 * on["usd_per_sample"], rel=1e-6)
    md = render_markdown(summarize(tmp_path / "batch"))
    assert "## Dollars per accepted sample" in md and "$ rationale" in md
    # each paid teacher line of the trace names the batch that answered it; the student's none
    trace = [t for t in iter_raw(tmp_path / "batch", "trace") if not t["cache_hit"]]
    ids = ("batch_", "msgbatch_", "gsim")  # OpenAI, Anthropic, Gemini (the simulator's names)
    assert all(t["batch"].startswith(ids) for t in trace if t["endpoint"] in TEACHERS)
    assert not any("batch" in t for t in trace if t["endpoint"] == "student")
