"""The FAIR job with its teachers on provider Batch APIs (OpenAI and Anthropic wires) and the
student online: the same records as an all-online run, the teachers at half the cost."""

from __future__ import annotations

from test_pipeline import TEACHERS, config, problems, profile, run

from engine.sim import start_sim
from engine.store import iter_records, read_manifest

WIRES = {"t-good": "openai", "t-mid": "anthropic", "t-harsh": "openai"}


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
            online.endpoints[name].provider = wire
        await run(online, tmp_path / "online", probs)
        sim.stats.reset()

        batch = config(sim.base_url)
        for name, wire in WIRES.items():
            ep = batch.endpoints[name]
            ep.provider, ep.mode = wire, "batch"
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
        # a request answered from the cache online may be sent twice in batch mode, when its twin
        # was still waiting in a batch: the same requests, counted either way
        assert b["calls"] + b["cache_hits"] == on["calls"] + on["cache_hits"] > 0
        at_online_price = (b["prompt_tokens"] * 1.0 + b["completion_tokens"] * 2.0) / 1e6
        assert abs(b["cost_usd"] - 0.5 * at_online_price) <= 1e-6
        total_on, total_b = total_on + on["cost_usd"], total_b + b["cost_usd"]
    assert 0.45 <= total_b / total_on <= 0.52
    assert m_b["endpoints"]["student"]["cost_usd"] == m_on["endpoints"]["student"]["cost_usd"]
