"""Key pools, observed (issue 23): the trace names the key (its variable) that served each call and
the keys a 401/403 retired, ``/metrics`` has per-key series, ``fair status`` a per-key table
computable from the trace alone, the manifest per-key counters, and ``--estimate`` projects the
wall time at the pool's capacity. Real ``fair`` processes against the simulator, over loopback."""

from __future__ import annotations

import asyncio
import math
import urllib.request
from pathlib import Path

import msgspec
import orjson
import pytest
import tomli_w
from fakeserver import fair, write_input
from test_metrics import free_port, one, scrape

from fairdistill.engine.config import EndpointConfig
from fairdistill.engine.fair.estimate import capacity
from fairdistill.engine.rundir.reader import record_decoder
from fairdistill.engine.rundir.schema import Problem
from fairdistill.engine.rundir.store import iter_raw, read_manifest
from fairdistill.engine.rundir.tracesum import TraceTotals
from fairdistill.engine.sim import start_sim
from fairdistill.engine.sim.profiles import KeyProfile, ModelProfile, SimProfile
from fairdistill.engine.sim.server import SimThread

VALUES = {
    "POOL_KEY_A": "sk-pool-AAAA-7f3e91",
    "POOL_KEY_B": "sk-pool-BBBB-52c0d4",
    "POOL_KEY_C": "sk-pool-CCCC-a81b66",
}
LABELS = {"POOL_KEY_A": "a", "POOL_KEY_B": "b", "POOL_KEY_C": "c"}
GROUPS = {"POOL_KEY_A": "org-ab", "POOL_KEY_B": "org-ab", "POOL_KEY_C": None}
TEACHERS = ["t1", "t2", "t3"]


def pool_profile(latency_ms: float = 5.0, **models: ModelProfile) -> SimProfile:
    """Three keys (a and b of one organisation), per-organisation prompt caches, no hidden limits."""
    keys = {LABELS[env]: KeyProfile(value=v, group=GROUPS[env]) for env, v in VALUES.items()}
    models = models or {"sim": ModelProfile(content="echo", latency_ms=latency_ms, prompt_cache=True)}
    return SimProfile(name="pool", seed=7, models=models, keys=keys)


def key_flags() -> list[str]:
    """``--key VAR[@GROUP]`` for each key of the pool."""
    return [a for env, g in GROUPS.items() for a in ("--key", f"{env}@{g}" if g else env)]


def revoke(base_url: str, label: str) -> None:
    root = base_url.removesuffix("/").removesuffix("/v1")
    req = urllib.request.Request(f"{root}/sim/keys/{label}/revoke", method="POST", data=b"")
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert resp.status == 200


def trace_lines(run_dir: Path) -> list[dict]:
    return list(iter_raw(run_dir, "trace"))


async def pool_generate(tmp_path: Path, n: int = 240) -> dict:
    """`fair generate` with a 3-key pool and --metrics-port; key b revoked once 60 calls went out,
    /metrics scraped after that, mid-run. Returns what each check below needs."""
    inp = write_input(tmp_path / "in.jsonl", n)
    out, port = tmp_path / "out", free_port()
    async with start_sim(pool_profile()) as sim:
        flags = key_flags()
        args = ["generate", "--endpoint", sim.base_url, "--model", "sim", "--input", str(inp),
                "--output", str(out), "--no-progress", "--concurrency", "4", "--metrics-port", str(port),
                *flags]  # fmt: skip
        run = asyncio.create_task(fair(*args, env=VALUES))
        while sim.stats["requests"] < 60 and not run.done():
            await asyncio.sleep(0.01)
        await asyncio.to_thread(revoke, sim.base_url, "b")
        while sim.stats["requests"] < 150 and not run.done():
            await asyncio.sleep(0.01)
        during = await asyncio.to_thread(scrape, port) if not run.done() else {}
        rc, stdout, stderr = await run
        by_key = {label: dict(c) for label, c in sim.stats.by_key.items()}
    return {"rc": rc, "stdout": stdout, "stderr": stderr, "out": out, "metrics": during,
            "sim_by_key": by_key, "n": n}  # fmt: skip


@pytest.fixture(scope="module")
def pool_run(tmp_path_factory) -> dict:
    return asyncio.run(pool_generate(tmp_path_factory.mktemp("pool")))


def test_the_trace_names_the_key_of_each_call_and_the_one_retired(pool_run):
    assert pool_run["rc"] == 0, pool_run["stderr"]
    lines = trace_lines(pool_run["out"])
    served = [t for t in lines if not t.get("cache_hit")]
    assert len(served) == pool_run["n"]
    assert {t["key"] for t in served} == set(VALUES)  # b served calls before it was revoked
    refused = [t for t in lines if t.get("refused")]
    assert refused and all(t["refused"] == ["POOL_KEY_B"] and t["key"] != "POOL_KEY_B" for t in refused)
    # what the simulator saw, per key, is what the trace says each key served (cached tokens too)
    sim = pool_run["sim_by_key"]
    for env, label in LABELS.items():
        mine = [t for t in served if t["key"] == env]
        assert len(mine) == sim[label]["ok"]
        assert sum(t["cached_tokens"] for t in mine) == sim[label]["cached_tokens"]
    assert sim["b"]["http_401"] == len(refused)
    assert "key POOL_KEY_B was refused" in pool_run["stderr"]


def test_metrics_have_per_key_series_by_variable_name(pool_run):
    m = pool_run["metrics"]
    assert m, "the run ended before the mid-run scrape"
    assert one(m, "fair_keys_live", endpoint="default") == 2
    assert one(m, "fair_key_live", endpoint="default", key="POOL_KEY_B") == 0
    assert one(m, "fair_key_live", endpoint="default", key="POOL_KEY_A") == 1
    assert one(m, "fair_key_auth_refused_total", endpoint="default", key="POOL_KEY_B") >= 1
    total = sum(one(m, "fair_key_http_calls_total", endpoint="default", key=env) for env in VALUES)
    assert total == one(m, "fair_http_calls_total", endpoint="default")
    ok = sum(one(m, "fair_key_requests_total", endpoint="default", key=env, outcome="ok") for env in VALUES)
    assert ok == one(m, "fair_requests_total", endpoint="default", outcome="ok")
    for env in ("POOL_KEY_A", "POOL_KEY_C"):
        assert one(m, "fair_key_effective_rpm", endpoint="default", key=env) > 0
        assert one(m, "fair_key_tokens_total", endpoint="default", key=env, kind="prompt") > 0
    cached = sum(
        one(m, "fair_key_tokens_total", endpoint="default", key=env, kind="cached") for env in VALUES
    )
    assert cached == one(m, "fair_tokens_total", endpoint="default", kind="cached")


def test_the_manifest_counts_each_key_and_dollars_whichever_key_paid(pool_run):
    ep = read_manifest(pool_run["out"])["endpoints"]["default"]
    keys = ep["keys"]
    assert set(keys) == set(VALUES) and keys["POOL_KEY_B"]["retired"] and keys["POOL_KEY_B"]["refused"] >= 1
    assert not keys["POOL_KEY_A"]["retired"] and not keys["POOL_KEY_C"]["retired"]
    assert sum(k["ok"] for k in keys.values()) == ep["ok"] == pool_run["n"]
    assert sum(k["calls"] for k in keys.values()) == ep["calls"]
    assert math.isclose(sum(k["cost_usd"] for k in keys.values()), ep["cost_usd"])
    assert sum(k["cached_tokens"] for k in keys.values()) == ep["cached_tokens"]


async def test_fair_status_shows_a_line_per_key_from_the_trace(pool_run):
    rc, stdout, stderr = await fair("status", str(pool_run["out"]))
    assert rc == 0, stderr
    rows = {
        ln.split("|")[2].strip(): ln for ln in stdout.splitlines() if ln.startswith("| default | POOL_KEY_")
    }
    assert set(rows) == set(VALUES)
    assert rows["POOL_KEY_B"].rstrip(" |").endswith("yes") and rows["POOL_KEY_A"].rstrip(" |").endswith("no")
    served = [t for t in trace_lines(pool_run["out"]) if t.get("key") == "POOL_KEY_C"]
    cells = [c.strip() for c in rows["POOL_KEY_C"].split("|")[1:-1]]
    assert int(cells[2]) == len(served)
    assert int(cells[5].replace(",", "")) == sum(t["cached_tokens"] for t in served)


def test_old_trace_lines_and_saved_totals_stay_valid():
    """A line without `key`/`refused` decodes (old traces), and totals saved before pools load."""
    line = msgspec.json.decode(b'{"endpoint":"e","model":"m","latency_s":0.1}', type=dict)
    decoded = record_decoder("trace").decode(orjson.dumps(line))
    assert decoded.key is None and decoded.refused == []
    t = TraceTotals()
    t.add(decoded, None)
    saved = t.as_json()
    old = {k: v for k, v in saved.items() if k not in ("keys", "key_sums")}
    assert TraceTotals.from_json(old).keys == {} and TraceTotals.from_json(saved).lines == 1


def test_pool_capacity_sums_keys_within_group_and_endpoint_limits():
    keys = [
        {"env": "K_A", "group": "org", "rpm": 600},
        {"env": "K_B", "group": "org", "rpm": 600},
        {"env": "K_C", "rpm": 400},
    ]
    raw = {"base_url": "http://x", "model": "m", "keys": keys, "groups": {"org": {"rpm": 900}}}
    ep = msgspec.convert(raw, EndpointConfig)
    assert capacity(ep, "rpm") == 900 + 400
    assert capacity(ep, "rpm", {"K_C"}) == 900
    assert capacity(ep, "rpm", {"K_A"}) == 600 + 400
    assert capacity(msgspec.structs.replace(ep, rpm=1000), "rpm") == 1000
    assert capacity(ep, "tpm") is None  # no key has a tpm: learned at run time, no bound
    open_key = msgspec.convert({**raw, "keys": [*keys, {"env": "K_D"}], "groups": {}}, EndpointConfig)
    assert capacity(open_key, "rpm") is None
    one_key = EndpointConfig(base_url="http://x", model="m", rpm=120)
    assert capacity(one_key, "rpm") == 120


def test_estimate_projects_wall_time_at_the_pool_capacity(tmp_path):
    """8 problems, a pilot of 2 through the real path with a 3-key pool on every endpoint."""
    probs = [Problem(id=f"d{i}", question=f"Ann has {i + 3} pens and buys {2 * i + 1} more. How many pens?",
                     answer=str(3 * i + 4), task="numeric", dataset="t") for i in range(8)]  # fmt: skip
    models = {t: ModelProfile(content="reasoning", skill=0.9, leniency=0.3) for t in TEACHERS}
    models["student"] = ModelProfile(content="reasoning", role="student", skill=0.4)
    data = tmp_path / "data.jsonl"
    data.write_bytes(b"".join(orjson.dumps({"id": p.id, "question": p.question, "answer": p.answer}) + b"\n"
                              for p in probs))  # fmt: skip
    with SimThread(pool_profile(**models), probs) as sim:
        pool = [
            {"env": env, "group": g, "rpm": 600} if g else {"env": env, "rpm": 400}
            for env, g in GROUPS.items()
        ]
        eps = {n: {"base_url": sim.base_url, "model": n, "max_attempts": 2, "timeout_s": 10, "keys": pool,
                   "groups": {"org-ab": {"rpm": 900}}} for n in [*TEACHERS, "student"]}  # fmt: skip
        job = tmp_path / "job.toml"
        job.write_text(tomli_w.dumps({
            "run": {"seed": 3, "max_in_flight": 8},
            "dataset": {"name": "jsonl", "path": str(data), "task": "numeric"},
            "student": {"endpoint": "student", "attempts": 2, "temperature": 0.7},
            "teachers": {"endpoints": TEACHERS}, "endpoints": eps,
        }))  # fmt: skip
        rc, _, stderr = asyncio.run(
            fair(
                "run", str(job), "--run-dir", str(tmp_path / "run"), "--estimate", "--pilot", "2", env=VALUES
            )
        )
    assert rc == 0, stderr
    est = orjson.loads((tmp_path / "run" / "estimate.json").read_bytes())
    for name, e in est["endpoints"].items():
        assert e["capacity_rpm"] == 900 + 400 and e["capacity_tpm"] is None, name
        assert e["wall_s_at_capacity"] == round(e["calls"] / 1300 * 60, 1)
        assert est["wall_s_online"] >= e["wall_s_at_capacity"]
    assert est["wall_s_online"] >= est["wall_s_pilot_scaled"]


def test_cluster_metrics_merge_key_rows_of_workers_and_the_limiter():
    """``--ray``: per-key rows of two workers summed, a key retired when one worker saw it refused,
    a gone worker's rates zero, the limiter's admission rate and retirement applied."""
    from fairdistill.engine.request.metrics import families, merge, zero_key_row
    from fairdistill.engine.scale.metrics import _gone, _limiter_keys

    def worker(calls: int, retired: int) -> dict:
        row = {**zero_key_row(), "calls": calls, "ok": calls, "rpm": 30.0, "retired": retired}
        return {"endpoints": {"e": {"keys": {"K_A": row, "K_B": {**row, "retired": 0}}}}, "stages": None}

    merged = merge([worker(5, 1), _gone(worker(7, 0))], ["e"])
    row = merged["endpoints"]["e"]
    assert row["keys"]["K_A"] == {**zero_key_row(), "calls": 12, "ok": 12, "rpm": 30.0, "retired": 1}
    _limiter_keys(row, {"K_B": {"rpm": 900.0, "live": False}, "K_C": {"rpm": 50.0, "live": True}})
    got = {m.name: {tuple(s.labels.values()): s.value for s in m.samples} for m in families(merged)}
    assert got["fair_keys_live"] == {("e",): 1}  # K_C only: A refused on a worker, B by the limiter
    assert got["fair_key_live"] == {("e", "K_A"): 0, ("e", "K_B"): 0, ("e", "K_C"): 1}
    assert got["fair_key_admission_rpm"] == {("e", "K_B"): 900.0, ("e", "K_C"): 50.0}
    assert got["fair_key_http_calls"] == {("e", "K_A"): 12, ("e", "K_B"): 12, ("e", "K_C"): 0}
    assert got["fair_key_effective_rpm"][("e", "K_A")] == 30.0  # the gone worker's rate is not counted
