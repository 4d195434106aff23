"""``run.max_cost_usd`` (a hard cap, resumable) and ``fair run --estimate`` against the simulator."""

from __future__ import annotations

import pytest
from fakeserver import fair
from test_pipeline import config, profile

from fairdistill.engine.config import dump_config
from fairdistill.engine.fair.budget import BudgetReached
from fairdistill.engine.fair.estimate import estimate
from fairdistill.engine.fair.pipeline import Job
from fairdistill.engine.rundir.store import read_manifest
from fairdistill.engine.sim import start_sim
from fairdistill.engine.sim.server import load_problems

DATASET = {"name": "builtin", "split": "all"}


def _cost(run_dir) -> float:
    return sum(e["cost_usd"] for e in read_manifest(run_dir)["endpoints"].values())


async def test_estimate_projects_the_dataset_and_the_full_run_resumes_from_the_pilot(tmp_path):
    probs = load_problems("builtin")
    async with start_sim(profile(), problems=probs) as sim:
        cfg = config(sim.base_url, dataset=DATASET)
        est = await estimate(cfg, tmp_path / "run", pilot=20)
        pilot_requests = sim.stats["requests"]
        assert est["problems"] == len(probs) and est["pilot"] == 20
        for name in ("t-good", "t-mid", "t-harsh"):
            e = est["endpoints"][name]
            assert e["calls"] > 0 and e["usd_batch"] == pytest.approx(0.5 * e["usd_online"], abs=1e-4)
        stages = est["stages"]
        assert {"student", "rationale", "review"} <= set(stages) and "other" not in stages
        assert all(v["calls"] > 0 and v["usd_online"] > 0 for v in stages.values())
        for key in ("calls", "usd_online", "usd_batch"):  # the same bill, cut the other way
            by_endpoint = sum(v[key] for v in est["endpoints"].values())
            assert sum(v[key] for v in stages.values()) == pytest.approx(by_endpoint, rel=0.01, abs=5)
        summary = await Job(cfg, tmp_path / "run", progress=False).run(probs)
        assert summary["counts"]["resumed_done"] == 20  # the pilot is not paid twice
        full_requests = sim.stats["requests"]
    actual = read_manifest(tmp_path / "run")["budget"]["spent_usd"]
    # the projection from 20 of 83 problems lands near the actual bill
    assert 0.6 * actual <= est["usd_online"] <= 1.6 * actual, (est["usd_online"], actual)
    assert full_requests > pilot_requests


async def test_cap_at_30_percent_stops_near_the_cap_then_resumes_to_completion_without_paying_twice(tmp_path):
    probs = load_problems("builtin")
    async with start_sim(profile(), problems=probs) as sim:
        cfg = config(sim.base_url, dataset=DATASET, run={"max_in_flight": 4})
        await Job(cfg, tmp_path / "ref", progress=False).run(probs)
        full, ref_requests = _cost(tmp_path / "ref"), sim.stats["requests"]
        sim.stats.reset()

        capped = config(sim.base_url, dataset=DATASET, run={"max_in_flight": 4, "max_cost_usd": 0.3 * full})
        with pytest.raises(BudgetReached, match=r"run\.max_cost_usd"):
            await Job(capped, tmp_path / "run", progress=False).run(probs)
        m = read_manifest(tmp_path / "run")
        assert m["status"] == "budget"
        spent = m["budget"]["spent_usd"]
        window = 4 * 3 * full / len(probs)  # max_in_flight problems at up to 3x the mean cost
        assert 0.3 * full - window <= spent <= 0.3 * full + window
        assert m["counts"]["problems"] < len(probs)

        raised = config(sim.base_url, dataset=DATASET, run={"max_in_flight": 4, "max_cost_usd": 10 * full})
        summary = await Job(raised, tmp_path / "run", progress=False).run(probs)
        assert summary["status"] == "done"
        # nothing paid twice (an in-run duplicate may even be a cache hit across the two runs)
        assert ref_requests - 5 <= sim.stats["requests"] <= ref_requests
    m = read_manifest(tmp_path / "run")
    assert m["counts"]["problems"] == len(probs)
    assert 0.98 * full <= m["budget"]["spent_usd"] <= full * (1 + 1e-6)


async def test_cli_estimate_prints_the_projection_and_a_cap_exits_3(tmp_path):
    probs = load_problems("builtin")
    async with start_sim(profile(), problems=probs) as sim:
        cfg = config(sim.base_url, dataset=DATASET)
        path = tmp_path / "job.toml"
        path.write_bytes(dump_config(cfg))
        rc, out, err = await fair(
            "run", str(path), "--run-dir", str(tmp_path / "est"), "--estimate", "--pilot", "10"
        )
        assert rc == 0, err
        assert "estimate for 83 problems from a pilot of 10" in out and "t-good" in out
        assert "rationale" in out and "review" in out
        assert (tmp_path / "est" / "estimate.json").exists()

        path.write_text(path.read_text().replace("[run]\n", "[run]\nmax_cost_usd = 0.0001\n"))
        rc, _, err = await fair("run", str(path), "--run-dir", str(tmp_path / "cap"), "--no-progress")
        assert rc == 3 and "run.max_cost_usd = 0.0001 reached" in err
        assert read_manifest(tmp_path / "cap")["status"] == "budget"

        path.write_text(path.read_text().replace("max_cost_usd = 0.0001", "max_cost_usd = -1"))
        rc, _, err = await fair("run", str(path), "--run-dir", str(tmp_path / "bad"))
        assert rc == 2 and "run.max_cost_usd" in err
