"""Key pools on provider Batch APIs: the real ``fair generate --mode batch --key ...`` against the
simulator with three keys in three organisations, where a batch belongs to the organisation that
made it (another organisation's key gets a 404). Asserted at the provider: which organisation made
each batch, how many batches and billed items there were; and that no key value is written."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import aiohttp
import msgspec
import orjson
import pytest
from fakeserver import fair, records, write_input

from fairdistill.engine.rundir.store import iter_raw, read_manifest
from fairdistill.engine.sim.profiles import KeyProfile, load_profile
from fairdistill.engine.sim.server import SimServer

VALUES = {"a": "sk-sim-batchpool-aaaa-0123456789", "b": "sk-sim-batchpool-bbbb-0123456789",
          "c": "sk-sim-batchpool-cccc-0123456789"}  # fmt: skip
ENV = {f"BK_{label.upper()}": value for label, value in VALUES.items()}
ORG = {"a": "org-a", "b": "org-b", "c": "c"}  # key c has no group: its own organisation
VAR_OF_ORG = {org: f"BK_{label.upper()}" for label, org in ORG.items()}
N = 30


def profile():
    keys = {
        label: KeyProfile(value=v, group=None if label == "c" else ORG[label]) for label, v in VALUES.items()
    }
    return msgspec.structs.replace(load_profile("default"), keys=keys)


def args(sim: SimServer, provider: str, inp: Path, out: Path, *extra: str) -> list[str]:
    return ["generate", "--endpoint", sim.base_url, "--model", "sim", "--provider", provider,
            "--input", str(inp), "--output", str(out), "--no-progress", "--max-tokens", "50",
            "--mode", "batch", "--batch-linger", "0.05", "--batch-poll", "0.05",
            "--key", "BK_A", "--key", "BK_B", "--key", "BK_C", *extra]  # fmt: skip


def journal(out: Path) -> dict[str, dict]:
    """Each local batch: its key variable (``open``) and provider id (``submitted``)."""
    got: dict[str, dict] = {}
    for raw in (out / "batches" / "journal.jsonl").read_bytes().splitlines():
        e = orjson.loads(raw)
        b = got.setdefault(e["local"], {})
        b.update({k: e[k] for k in ("key_env", "id") if e.get(k)})
    return got


def no_key_anywhere(out: Path, *said: str) -> None:
    """No key value in the run directory (records, cache, trace, journal, results, manifest) or output."""
    for path in out.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not any(v.encode() in data or v[:10].encode() in data for v in VALUES.values()), path
    for text in said:
        assert not any(v in text or v[:10] in text for v in VALUES.values())


def ok_records(out: Path) -> dict[str, dict]:
    got = records(out)
    assert len(got) == N and not [r["error"] for r in got.values() if r["error"]]
    return got


async def revoke(sim: SimServer, label: str, verb: str = "revoke") -> None:
    async with aiohttp.ClientSession() as http, http.post(f"{sim.url}/sim/keys/{label}/{verb}") as r:
        assert r.status == 200, await r.text()


@pytest.mark.parametrize("provider", ["openai", "anthropic", "gemini"])
async def test_batches_are_made_per_key_and_each_organisation_sees_its_own(tmp_path, provider):
    inp, out = write_input(tmp_path / "in.jsonl", N), tmp_path / "out"
    async with SimServer(profile()) as sim:
        cmd = args(sim, provider, inp, out)
        if provider == "gemini":
            cmd[2] = sim.base_url.removesuffix("/v1") + "/v1beta"
        rc, said, err = await fair(*cmd, env=ENV)
        assert rc == 0, err
        batches = dict(sim.batch.batches)
        assert sim.stats["batch_items"] == sim.stats["batch_items_billed"] == N  # each paid once
    ok_records(out)
    assert {b.org for b in batches.values()} == set(ORG.values())  # every key made batches of its own
    made = {b["id"]: b["key_env"] for b in journal(out).values() if "id" in b}
    assert made and all(made[bid] == VAR_OF_ORG[b.org] for bid, b in batches.items())  # journalled key
    trace = [t for t in iter_raw(out, "trace") if not t["cache_hit"]]
    assert len(trace) == N and all(t["key"] == made[t["batch"]] for t in trace)  # the key that answered
    rc, listing, _ = await fair("batches", "list", str(out))
    assert rc == 0 and all(f"key {var}" in listing for var in VAR_OF_ORG.values())
    no_key_anywhere(out, said, err, listing)


async def test_a_resumed_run_polls_each_batch_with_the_key_that_made_it(tmp_path):
    inp, out = write_input(tmp_path / "in.jsonl", N), tmp_path / "out"
    async with SimServer(profile()) as sim:
        sim.batch.faults = msgspec.convert({"start_s": 1.0}, type(sim.batch.faults))
        rc, _, _ = await fair(
            *args(sim, "openai", inp, out), env=ENV, kill_when=lambda: sim.stats["batches_created"] >= 3
        )
        assert rc == -signal.SIGKILL
        await asyncio.sleep(0.1)
        # a pool that no longer lists the key of a batch cannot follow it: exit 2, naming the variable
        rc, _, err = await fair(*args(sim, "openai", inp, out)[:-2], env=ENV)
        assert rc == 2 and "made with key BK_C" in err and "Traceback" not in err, err
        # another organisation's key is answered 404 for a batch: only each batch's own key collects it
        rc, _, err = await fair(*args(sim, "openai", inp, out), env=ENV)
        assert rc == 0, err
        assert sim.stats["batches_created"] == 3 and sim.stats["batch_items_billed"] == N
    ok_records(out)
    assert read_manifest(out)["generate"]["batch"]["reattached"] == 3
    no_key_anywhere(out, err)


async def test_batches_cancel_cancels_each_batch_with_the_key_that_made_it(tmp_path):
    inp, out = write_input(tmp_path / "in.jsonl", N), tmp_path / "out"
    async with SimServer(profile()) as sim:
        sim.batch.faults = msgspec.convert({"start_s": 30}, type(sim.batch.faults))
        path = out / "batches" / "journal.jsonl"
        rc, _, _ = await fair(
            *args(sim, "anthropic", inp, out),
            env=ENV,
            kill_when=lambda: path.exists() and path.read_bytes().count(b'"submitted"') >= 3,
        )
        assert rc == -signal.SIGKILL
        await asyncio.sleep(0.1)
        rc, said, err = await fair("batches", "cancel", str(out), env=ENV)
        assert rc == 0, err  # another organisation's key would be answered 404: not canceled
        assert said.count("canceled fb-") == 3
        assert all(b.ended is not None for b in sim.batch.batches.values())
    no_key_anywhere(out, said, err)


async def test_with_fan_out_through_the_engine_a_refused_key_s_requests_go_to_the_others(tmp_path):
    inp, out = write_input(tmp_path / "in.jsonl", N), tmp_path / "out"
    async with SimServer(profile()) as sim:
        await revoke(sim, "a")
        rc, said, err = await fair(*args(sim, "anthropic", inp, out, "--n", "2"), env=ENV)
        assert rc == 0, err
        assert {b.org for b in sim.batch.batches.values()} == {"org-b", "c"}
        assert sim.stats["batch_items"] == sim.stats["batch_items_billed"] == 2 * N
    assert all(len(r["texts"]) == 2 for r in ok_records(out).values())
    assert len([x for x in err.splitlines() if "key BK_A retired" in x]) == 1, err
    no_key_anywhere(out, said, err)


async def test_an_old_journal_without_the_key_variable_polls_with_the_endpoint_s_one_key(tmp_path):
    inp, out = write_input(tmp_path / "in.jsonl", N), tmp_path / "out"
    one = ["--api-key-env", "BK_B"]
    async with SimServer(profile()) as sim:
        sim.batch.faults = msgspec.convert({"start_s": 1.0}, type(sim.batch.faults))
        cmd = args(sim, "anthropic", inp, out)[:-6] + one
        rc, _, _ = await fair(*cmd, env=ENV, kill_when=lambda: sim.stats["batches_created"] >= 1)
        assert rc == -signal.SIGKILL
        path = out / "batches" / "journal.jsonl"
        lines = [orjson.loads(x) for x in path.read_bytes().splitlines()]
        assert lines[0]["key_env"] == "BK_B"
        path.write_bytes(
            b"".join(orjson.dumps({k: v for k, v in e.items() if k != "key_env"}) + b"\n" for e in lines)
        )
        rc, _, err = await fair(*cmd, env=ENV)
        assert rc == 0, err
        assert sim.stats["batches_created"] == 1 and sim.stats["batch_items_billed"] == N
    ok_records(out)


async def test_a_revoked_key_is_retired_and_its_requests_go_to_the_other_keys(tmp_path):
    inp, out = write_input(tmp_path / "in.jsonl", N), tmp_path / "out"
    async with SimServer(profile()) as sim:
        await revoke(sim, "b")
        rc, said, err = await fair(*args(sim, "openai", inp, out), env=ENV)
        assert rc == 0, err
        orgs = {b.org for b in sim.batch.batches.values()}
        assert sim.stats["batch_items"] == sim.stats["batch_items_billed"] == N  # nothing made twice
    ok_records(out)
    assert orgs == {"org-a", "c"}
    retired = [line for line in err.splitlines() if "retired for this run" in line]
    assert len(retired) == 1 and "key BK_B" in retired[0] and "2 of 3 keys" in retired[0], err
    assert {t.get("key") for t in iter_raw(out, "trace")} == {"BK_A", "BK_C"}
    assert read_manifest(out)["generate"]["batch"]["keys_retired"] == 1
    no_key_anywhere(out, said, err)


async def test_every_key_refused_aborts_with_exit_3_naming_the_variables(tmp_path):
    inp, out = write_input(tmp_path / "in.jsonl", 10), tmp_path / "out"
    async with SimServer(profile()) as sim:
        for label in VALUES:
            await revoke(sim, label)
        rc, said, err = await fair(*args(sim, "anthropic", inp, out), env=ENV)
        assert sim.stats["batches_created"] == 0
    assert rc == 3, err
    assert "refused every key" in err and all(var in err for var in ENV)
    no_key_anywhere(out, said, err)


async def test_a_key_refused_after_its_batch_was_made_is_never_made_again_and_a_rerun_collects_it(tmp_path):
    inp, out = write_input(tmp_path / "in.jsonl", N), tmp_path / "out"
    async with SimServer(profile()) as sim:
        sim.batch.faults = msgspec.convert({"start_s": 1.5}, type(sim.batch.faults))
        task = asyncio.create_task(fair(*args(sim, "openai", inp, out), env=ENV))
        while sim.stats["batches_created"] < 3 and not task.done():
            await asyncio.sleep(0.01)
        await revoke(sim, "b")  # its batch is at the provider: polls of it are refused now
        rc, said, err = await task
        assert rc == 1, err
        assert sim.stats["batches_created"] == 3  # nothing sent again with another key
        (held,) = [b for b in sim.batch.batches.values() if b.org == "org-b"]
        line = next(x for x in err.splitlines() if held.id in x)
        assert "BK_B" in line and "fair batches" in line and "not sent again" in line, err
        got = records(out)
        assert len(got) == N - len(held.items) and not any(r["error"] for r in got.values())

        await revoke(sim, "b", "restore")
        rc, said2, err2 = await fair(*args(sim, "openai", inp, out), env=ENV)
        assert rc == 0, err2
        assert sim.stats["batches_created"] == 3 and sim.stats["batch_items_billed"] == N
    ok_records(out)
    no_key_anywhere(out, said, err, said2, err2)
