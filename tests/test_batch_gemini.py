"""Gemini batch mode, over loopback HTTP against the simulator's ``/v1beta`` routes (Files API
upload, ``models/M:batchGenerateContent``, ``batches``, ``:download``): equal records at half the
cost, never paying twice (SIGKILL, lost create reply found by display name), rounds, credentials,
and ``fair batches`` on a Gemini run. The helpers of ``test_batch`` are reused with the Gemini
base URL (``{sim.url}/v1beta``)."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import aiohttp
import msgspec
import orjson
import pytest
from fakeserver import fair, records, write_input
from test_batch import cli_args as _cli_args
from test_batch import endpoint as _endpoint
from test_batch import texts

from fairdistill.engine.config import EndpointConfig
from fairdistill.engine.generate import generate
from fairdistill.engine.request.batch.gemini import GeminiBatchWire
from fairdistill.engine.request.batch.wire import TRANSIENT, file_lines
from fairdistill.engine.rundir.store import read_manifest
from fairdistill.engine.sim.server import SimServer


def base(sim: SimServer) -> str:
    return f"{sim.url}/v1beta"


def endpoint(sim: SimServer, mode: str = "batch", **batch) -> EndpointConfig:
    return msgspec.structs.replace(_endpoint(sim, "gemini", mode, **batch), base_url=base(sim))


def cli_args(sim: SimServer, inp: Path, out: Path, *extra: str) -> list[str]:
    args = _cli_args(sim, "gemini", inp, out, *extra)
    return [base(sim) if a == sim.base_url else a for a in args]


def faults(sim: SimServer, **kw) -> None:
    sim.batch.faults = msgspec.convert(kw, type(sim.batch.faults))


def events(out: Path) -> list[str]:
    return [orjson.loads(x)["ev"] for x in (out / "batches" / "journal.jsonl").read_bytes().splitlines()]


# -- the simulator's routes ---------------------------------------------------------------------


async def test_sim_gemini_upload_create_poll_download_list_and_cancel():
    req = {
        "contents": [{"role": "user", "parts": [{"text": "q"}]}],
        "systemInstruction": {"parts": [{"text": "be brief"}]},
        "generationConfig": {"temperature": 0, "maxOutputTokens": 100},
    }
    async with SimServer("default") as sim, aiohttp.ClientSession() as http:
        g = base(sim)
        async with http.post(f"{g}/models/sim:generateContent", json=req) as r:
            online = await r.json()
        assert r.status == 200 and online["candidates"][0]["content"]["parts"][0]["text"]
        assert online["usageMetadata"]["promptTokenCount"] > 0

        lines = b"".join(orjson.dumps({"key": f"k{i}", "request": req}) + b"\n" for i in range(5))
        start = {"X-Goog-Upload-Protocol": "resumable", "X-Goog-Upload-Command": "start"}
        async with http.post(f"{sim.url}/upload/v1beta/files", json={"file": {"display_name": "in"}},
                             headers=start) as r:  # fmt: skip
            where = r.headers["X-Goog-Upload-URL"]
        assert where.startswith(sim.url + "/upload/v1beta/files?")
        fin = {"X-Goog-Upload-Command": "upload, finalize", "X-Goog-Upload-Offset": "0"}
        async with http.post(where, data=lines, headers=fin) as r:
            f = (await r.json())["file"]
        assert f["name"].startswith("files/") and f["sizeBytes"] == str(len(lines))
        create = {"batch": {"display_name": "L1", "input_config": {"file_name": f["name"]}}}
        async with http.post(f"{g}/models/sim:batchGenerateContent", json=create) as r:
            op = await r.json()
        assert op["metadata"]["state"] == "BATCH_STATE_PENDING" and op["metadata"]["displayName"] == "L1"
        assert op["name"].startswith("batches/") and op["metadata"]["batchStats"]["requestCount"] == "5"
        for _ in range(100):
            async with http.get(f"{g}/{op['name']}") as r:
                op = await r.json()
            if op.get("done"):
                break
            await asyncio.sleep(0.02)
        assert op["metadata"]["state"] == "BATCH_STATE_SUCCEEDED"
        assert op["metadata"]["batchStats"]["successfulRequestCount"] == "5"
        out_file = op["response"]["responsesFile"]
        async with http.get(f"{sim.url}/download/v1beta/{out_file}:download?alt=media") as r:
            got = [orjson.loads(x) for x in (await r.read()).splitlines()]
        assert sorted(x["key"] for x in got) == [f"k{i}" for i in range(5)]
        assert all(x["response"]["candidates"] == online["candidates"] for x in got)  # one content path

        # a second batch, listed newest first and paged by token; cancelled while it waits
        faults(sim, start_s=30)
        async with http.post(f"{g}/models/sim:batchGenerateContent", json=create) as r:
            second = await r.json()
        async with http.get(f"{g}/batches?pageSize=1") as r:
            page = await r.json()
        assert [o["name"] for o in page["operations"]] == [second["name"]] and page["nextPageToken"]
        async with http.get(f"{g}/batches?pageSize=1&pageToken={page['nextPageToken']}") as r:
            page2 = await r.json()
        assert [o["name"] for o in page2["operations"]] == [op["name"]] and "nextPageToken" not in page2
        async with http.post(f"{g}/{second['name']}:cancel") as r:
            assert r.status == 200 and await r.json() == {}
        async with http.get(f"{g}/{second['name']}") as r:
            assert (await r.json())["metadata"]["state"] == "BATCH_STATE_CANCELLED"
        async with http.get(f"{g}/batches/nope") as r:
            assert r.status == 404 and (await r.json())["error"]["status"] == "NOT_FOUND"
        assert sim.stats["batches_created"] == 2 and sim.stats["batch_items_billed"] == 5
        assert sim.stats["requests"] == 1  # the one online call


async def test_wire_maps_item_and_batch_validation_errors_to_their_items(tmp_path):
    """An unreadable request fails its own item (INVALID_ARGUMENT); an unreadable input line fails
    the batch, and the item on the line its error names fails while the rest go again."""
    good = b'{"contents":[{"role":"user","parts":[{"text":"q"}]}]}'
    async with SimServer("default") as sim, aiohttp.ClientSession() as http:
        wire = GeminiBatchWire(http, base(sim), None, "g", "sim")

        async def run(pairs: list[tuple[str, bytes]], local: str) -> list[tuple[str, int, bytes]]:
            path = tmp_path / f"{local}.jsonl"
            with open(path, "wb") as f:
                wire.write_input(pairs, f)
            remote = await wire.create(path, local)
            while not remote.ended:
                await asyncio.sleep(0.02)
                remote = await wire.retrieve(remote.id)
            with open(tmp_path / f"{local}.out", "w+b") as f:
                await wire.download(remote, f)
                return list(wire.parse(file_lines(f), remote, [c for c, _ in pairs]))

        got = {c: (s, b) for c, s, b in await run([("a", good), ("b", b'{"contents":[]}')], "L1")}
        assert got["a"][0] == 200 and got["b"][0] == 400
        assert b"contents" in got["b"][1]
        got = await run([("a", good), ("b", b"not json"), ("c", good)], "L2")
        assert [(c, s) for c, s, _ in got] == [("a", TRANSIENT), ("b", 400), ("c", TRANSIENT)]
        assert b"line 2" in got[1][2]
        (found,) = await wire.find("L2", 0.0, 3)
        assert found.status == "failed" and found.local == "L2"


async def test_wire_keeps_the_key_on_its_host_and_server_names_out_of_paths(tmp_path):
    """A hostile server: an upload URL on another host is not followed (the key would go with
    it), and a batch name that is not a plain id never reaches a URL."""
    from aiohttp import web

    from fairdistill.engine.request.batch.wire import ControlError

    async def start(request: web.Request) -> web.Response:
        return web.Response(headers={"X-Goog-Upload-URL": "http://198.51.100.7/upload/v1beta/files?id=1"})

    async def get(request: web.Request) -> web.Response:
        return web.json_response({"name": "batches/../files/x", "metadata": {"state": "BATCH_STATE_RUNNING"}})

    app = web.Application()
    app.router.add_post("/upload/v1beta/files", start)
    app.router.add_get("/v1beta/batches/{bid}", get)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        path = tmp_path / "in.jsonl"
        path.write_bytes(GeminiBatchWire.line("fd1", b"{}"))
        async with aiohttp.ClientSession() as http:
            wire = GeminiBatchWire(http, f"http://127.0.0.1:{port}/v1beta", None, "g", "m")
            with pytest.raises(ControlError, match="no usable X-Goog-Upload-URL"):
                await wire.create(path, "L1")
            with pytest.raises(ControlError, match="unusable batch name"):
                await wire.retrieve("abc")
            with pytest.raises(ControlError, match="unusable batch name"):
                await wire.retrieve("../x")  # checked before it goes into the URL
    finally:
        await runner.cleanup()


# -- generate on the Gemini wire -----------------------------------------------------------------


async def test_batch_and_online_give_equal_records_at_half_the_cost(tmp_path):
    inp = write_input(tmp_path / "in.jsonl", 40)
    async with SimServer("default") as sim:
        online = await generate(
            inp, tmp_path / "online", endpoint(sim, "online"), progress=False, max_tokens=200
        )
        assert sim.stats["requests"] == 40
        sim.stats.reset()
        batch = await generate(inp, tmp_path / "batch", endpoint(sim), progress=False, max_tokens=200)
        assert sim.stats["batch_items_billed"] == 40 and sim.stats["requests"] == 0  # nothing went online
        assert sim.stats["batches_created"] == 1
    assert online["ok"] == 40 and batch["status"] == "done" and batch["ok"] == 40
    assert texts(tmp_path / "batch") == texts(tmp_path / "online")
    assert batch["cost_usd"] == pytest.approx(0.5 * online["cost_usd"], rel=1e-3)
    assert batch["prompt_tokens"] == online["prompt_tokens"] > 0
    assert events(tmp_path / "batch") == ["open", "creating", "submitted", "ended", "ingested"]
    again = await generate(inp, tmp_path / "batch", endpoint(sim), progress=False, max_tokens=200)
    assert again["skipped_existing"] == 40 and len(events(tmp_path / "batch")) == 5


@pytest.mark.parametrize(
    "fault",
    [
        {"expire_at": 0.4, "p_item_5xx": 0.2, "truncate_results": 1, "batches": 1},
        {"cancel_at": 0.3, "batches": 1},
    ],
    ids=["expiry-5xx-truncated", "external-cancel"],
)
async def test_unanswered_items_go_to_a_second_round_and_are_paid_once(tmp_path, fault):
    inp = write_input(tmp_path / "in.jsonl", 30)
    async with SimServer("default") as sim:
        faults(sim, **fault)
        summary = await generate(inp, tmp_path / "out", endpoint(sim), progress=False, max_tokens=200)
        stats = dict(sim.stats)
    assert summary["status"] == "done" and summary["ok"] == 30
    assert stats["batches_created"] == 2 and stats["batch_items_billed"] == 30  # each request paid once
    assert stats["batch_items"] - 30 == summary["batch"]["requeued"] > 0
    assert stats.get("batch_downloads_truncated", 0) == fault.get("truncate_results", 0)


async def test_max_rounds_one_fails_the_unanswered_records_with_exit_1(tmp_path):
    inp = write_input(tmp_path / "in.jsonl", 20)
    async with SimServer("default") as sim:
        faults(sim, expire_at=0.4)
        rc, _, err = await fair(*cli_args(sim, inp, tmp_path / "out", "--batch-max-rounds", "1"))
        assert sim.stats["batches_created"] == 1 and sim.stats["batch_items_billed"] == 8
    assert rc == 1, err
    got = records(tmp_path / "out")
    failed = [r for r in got.values() if r["error"]]
    assert len(got) == 20 and len(failed) == 12 and "max_rounds = 1" in failed[0]["error"]


# -- never pay twice ---------------------------------------------------------------------------


async def test_sigkill_after_submit_then_rerun_creates_no_second_batch(tmp_path):
    inp = write_input(tmp_path / "in.jsonl", 30)
    out = tmp_path / "out"
    async with SimServer("default") as sim:
        faults(sim, start_s=1.0)
        rc, _, _ = await fair(*cli_args(sim, inp, out), kill_when=lambda: sim.stats["batches_created"] >= 1)
        assert rc == -signal.SIGKILL
        await asyncio.sleep(0.1)
        rc, _, err = await fair(*cli_args(sim, inp, out))
        assert rc == 0, err
        assert sim.stats["batches_created"] == 1
        assert sim.stats["batch_items"] == sim.stats["batch_items_billed"] == 30  # billed == unique
    assert len(records(out)) == 30 and not any(r["error"] for r in records(out).values())
    assert read_manifest(out)["generate"]["batch"]["reattached"] == 1


async def test_lost_create_reply_is_found_by_display_name_live_and_after_a_kill(tmp_path):
    inp = write_input(tmp_path / "in.jsonl", 25)
    async with SimServer("default") as sim:
        faults(sim, lose_create=1)  # the batch is made, the client sees a 500
        summary = await generate(inp, tmp_path / "live", endpoint(sim), progress=False, max_tokens=200)
        assert summary["ok"] == 25 and summary["batch"]["creates_recovered"] == 1
        assert sim.stats["batches_created"] == 1 and sim.stats["batch_items_billed"] == 25

        # killed while creating (journal: creating, no submitted): the rerun finds it, no second batch
        sim.stats.reset()
        faults(sim, lose_create=1, start_s=0.5, slow_list_s=1.0)
        out, inp = tmp_path / "killed", tmp_path / "in2.jsonl"
        inp.write_bytes(
            b"".join(orjson.dumps({"id": f"k{i}", "prompt": f"other {i}"}) + b"\n" for i in range(25))
        )
        rc, _, _ = await fair(
            *cli_args(sim, inp, out), kill_when=lambda: sim.stats["batch_creates_lost"] >= 1
        )
        assert rc == -signal.SIGKILL and events(out)[-1] == "creating"
        rc, _, err = await fair(*cli_args(sim, inp, out))
        assert rc == 0, err
        assert sim.stats["batches_created"] == 1 and sim.stats["batch_items_billed"] == 25
    assert len(records(out)) == 25 and not any(r["error"] for r in records(out).values())


async def test_refused_credentials_exit_3_and_no_key_in_the_run_dir(tmp_path):
    """Google refuses a wrong key with a 400 whose reason is API_KEY_INVALID, a missing one with
    a 403: both abort the run (exit 3) at the first control call, before anything is paid."""
    from fairdistill.engine.sim.profiles import load_profile

    secret = "AIzaSyTestSecretKey0123456789abcdef"
    prof = msgspec.structs.replace(load_profile("default"), api_key=secret)
    inp = write_input(tmp_path / "in.jsonl", 10)
    async with SimServer(prof) as sim:
        ok = cli_args(sim, inp, tmp_path / "ok", "--api-key-env", "SIMKEY")
        rc, _, err = await fair(*ok, env={"SIMKEY": secret})
        assert rc == 0, err  # the key went in x-goog-api-key (the simulator takes it nowhere else)
        assert sim.stats["batch_items_billed"] == 10
        bad = cli_args(sim, inp, tmp_path / "bad", "--api-key-env", "SIMKEY")
        rc, _, err = await fair(*bad, env={"SIMKEY": "AIzaSyWrongKey999999999999"})
        assert rc == 3 and "refused the credentials (HTTP 400: API key not valid" in err, err
        assert "WrongKey" not in err and "Traceback" not in err
        args = cli_args(sim, inp, tmp_path / "bad-online", "--api-key-env", "SIMKEY")
        at = args.index("--mode")  # "--mode batch --batch-linger X --batch-poll Y": batch mode only
        online = [*args[:at], "--mode", "online", *args[at + 6 :]]
        rc, _, err = await fair(*online, env={"SIMKEY": "AIzaSyWrongKey999999999999"})
        assert rc == 3 and "refused the credentials (HTTP 400" in err, err  # online: the same abort
        rc, _, err = await fair(*cli_args(sim, inp, tmp_path / "none"))
        assert rc == 3 and "refused the credentials (HTTP 403" in err, err
        assert sim.stats["batches_created"] == 1
    for path in tmp_path.rglob("*"):
        if path.is_file():  # records, cache, trace, journal, results files, manifest
            data = path.read_bytes()
            assert secret.encode() not in data and b"WrongKey" not in data, path


# -- fair batches on a Gemini run ----------------------------------------------------------------


async def test_fair_batches_list_cancel_attach_on_a_gemini_run(tmp_path):
    inp = write_input(tmp_path / "in.jsonl", 20)
    out = tmp_path / "out"
    journal = out / "batches" / "journal.jsonl"
    async with SimServer("default") as sim:
        faults(sim, start_s=30)
        rc, _, _ = await fair(
            *cli_args(sim, inp, out),
            kill_when=lambda: journal.exists() and b'"submitted"' in journal.read_bytes(),
        )
        assert rc == -signal.SIGKILL
        (batch,) = sim.batch.batches.values()
        rc, listing, _ = await fair("batches", "list", str(out))
        assert rc == 0 and batch.id in listing and "submitted" in listing and "20 requests" in listing
        rc, said, err = await fair("batches", "cancel", str(out), f"batches/{batch.id}")
        assert rc == 0 and "canceled fb-" in said and "cancelled" in said, err
        assert batch.ended is not None and batch.obj["metadata"]["state"] == "BATCH_STATE_CANCELLED"
        faults(sim)
        rc, _, err = await fair(*cli_args(sim, inp, out))
        assert rc == 0, err
        assert sim.stats["batches_created"] == 2 and sim.stats["batch_items_billed"] == 20
    assert len(records(out)) == 20 and not any(r["error"] for r in records(out).values())

    # attach takes Google's resource name too (the journal keeps the bare id)
    other = tmp_path / "other"
    (other / "batches").mkdir(parents=True)
    (other / "batches" / "journal.jsonl").write_bytes(
        b'{"ev":"open","local":"L9","lane":"default","provider":"gemini"}\n'
        b'{"ev":"creating","local":"L9","n":3,"ids":["a","b","c"]}\n'
    )
    rc, said, err = await fair("batches", "attach", str(other), "L9", "batches/abc123")
    assert rc == 0 and "attached to abc123" in said, err
    rc, listing, _ = await fair("batches", "list", str(other))
    assert "L9\tdefault\tsubmitted\tabc123" in listing
