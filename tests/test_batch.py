"""Provider Batch APIs as a second executor, over loopback HTTP against the simulator's batch
routes: equal records at half the cost, faults (expiry, item 5xx, truncated downloads, a lost
create reply), SIGKILL after submit, and the journal."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import aiohttp
import msgspec
import orjson
import pytest
from fakeserver import fair, records, write_input

from fairdistill.engine.config import BatchConfig, EndpointConfig
from fairdistill.engine.generate import generate
from fairdistill.engine.rundir.store import read_manifest
from fairdistill.engine.sim.server import SimServer

PROVIDERS = ["openai", "anthropic"]
FAST = {"linger_s": 0.05, "poll_s": 0.05}


def endpoint(sim: SimServer, provider: str, mode: str = "batch", **batch) -> EndpointConfig:
    return EndpointConfig(
        provider=provider,
        base_url=sim.base_url,
        model="sim",
        price_in=1.0,
        price_out=2.0,
        mode=mode,
        batch=BatchConfig(**{**FAST, **batch}),
        max_attempts=2,
    )


def cli_args(sim: SimServer, provider: str, inp: Path, out: Path, *extra: str) -> list[str]:
    return ["generate", "--endpoint", sim.base_url, "--model", "sim", "--provider", provider,
            "--input", str(inp), "--output", str(out), "--no-progress", "--max-tokens", "200",
            "--mode", "batch", "--batch-linger", "0.05", "--batch-poll", "0.05",
            "--price-in", "1", "--price-out", "2", *extra]  # fmt: skip


def texts(out: Path) -> dict[str, list[str]]:
    return {k: v["texts"] for k, v in records(out).items()}


# -- the simulator's routes ---------------------------------------------------------------------


async def test_sim_openai_files_and_batches_routes(tmp_path):
    async with SimServer("default") as sim, aiohttp.ClientSession() as http:
        base = sim.base_url

        def line(i: int) -> bytes:
            body = {"model": "sim", "messages": [{"role": "user", "content": f"q{i}"}]}
            return orjson.dumps(
                {"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}
            )

        lines = b"".join(line(i) + b"\n" for i in range(5))
        form = aiohttp.FormData({"purpose": "batch"})
        form.add_field("file", lines, filename="in.jsonl")
        async with http.post(f"{base}/files", data=form) as r:
            f = await r.json()
            assert r.status == 200 and f["purpose"] == "batch" and f["bytes"] == len(lines)
        create = {"input_file_id": f["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h",
                  "metadata": {"fair_batch": "L1"}}  # fmt: skip
        async with http.post(f"{base}/batches", json=create) as r:
            b = await r.json()
            assert (
                b["object"] == "batch" and b["status"] == "validating" and b["metadata"]["fair_batch"] == "L1"
            )
        for _ in range(100):
            async with http.get(f"{base}/batches/{b['id']}") as r:
                b = await r.json()
            if b["status"] == "completed":
                break
            await asyncio.sleep(0.02)
        assert b["request_counts"] == {"total": 5, "completed": 5, "failed": 0} and b["error_file_id"] is None
        async with http.get(f"{base}/files/{b['output_file_id']}/content") as r:
            out = [orjson.loads(x) for x in (await r.read()).splitlines()]
        assert sorted(o["custom_id"] for o in out) == [f"c{i}" for i in range(5)]
        assert all(o["response"]["status_code"] == 200 and o["response"]["body"]["choices"] for o in out)
        async with http.get(f"{base}/batches?limit=1") as r:
            page = await r.json()
            assert page["data"][0]["id"] == b["id"]

        # a bad line fails validation, naming the line
        form = aiohttp.FormData({"purpose": "batch"})
        form.add_field("file", lines + b'{"custom_id": "x"}\n', filename="in.jsonl")
        async with http.post(f"{base}/files", data=form) as r:
            fid = (await r.json())["id"]
        async with http.post(f"{base}/batches", json={**create, "input_file_id": fid}) as r:
            bad = await r.json()
        assert bad["status"] == "failed" and bad["errors"]["data"][0]["line"] == 6
        assert sim.stats["batches_created"] == 2 and sim.stats["batch_items_billed"] == 5


async def test_sim_anthropic_batches_online_messages_and_faults():
    async with SimServer("default") as sim, aiohttp.ClientSession() as http:
        base = sim.base_url
        params = {
            "model": "sim",
            "max_tokens": 100,
            "system": "be brief",
            "messages": [{"role": "user", "content": "q"}],
        }
        async with http.post(f"{base}/messages", json=params) as r:
            online = await r.json()
            assert r.status == 200 and online["type"] == "message" and online["content"][0]["type"] == "text"
        sim.batch.faults = msgspec.convert({"expire_at": 0.4, "turnaround_s": 0.0}, type(sim.batch.faults))
        reqs = [{"custom_id": f"c{i}", "params": params} for i in range(10)]
        async with http.post(f"{base}/messages/batches", json={"requests": reqs}) as r:
            b = await r.json()
            assert b["type"] == "message_batch" and b["processing_status"] == "in_progress"
        for _ in range(100):
            async with http.get(f"{base}/messages/batches/{b['id']}") as r:
                b = await r.json()
            if b["processing_status"] == "ended":
                break
            await asyncio.sleep(0.02)
        assert b["request_counts"]["succeeded"] == 4 and b["request_counts"]["expired"] == 6
        async with http.get(b["results_url"]) as r:
            res = [orjson.loads(x) for x in (await r.read()).splitlines()]
        kinds = sorted(x["result"]["type"] for x in res)
        assert kinds == ["expired"] * 6 + ["succeeded"] * 4
        ok = next(x for x in res if x["result"]["type"] == "succeeded")
        assert ok["result"]["message"]["content"] == online["content"]  # same content path as online
        async with http.post(
            f"{base}/messages/batches", json={"requests": [{"custom_id": "bad id!", "params": params}]}
        ) as r:
            assert r.status == 400 and "custom_id" in (await r.json())["error"]["message"]
        assert sim.stats["batch_items_billed"] == 4 and sim.stats["batches_created"] == 1


# -- generate through a Batch API ---------------------------------------------------------------


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_batch_and_online_give_equal_records_at_half_the_cost(tmp_path, provider):
    inp = write_input(tmp_path / "in.jsonl", 40)
    async with SimServer("default") as sim:
        online = await generate(
            inp, tmp_path / "online", endpoint(sim, provider, "online"), progress=False, max_tokens=200
        )
        sim.stats.reset()
        batch = await generate(
            inp, tmp_path / "batch", endpoint(sim, provider), progress=False, max_tokens=200
        )
        assert sim.stats["batch_items_billed"] == 40 and sim.stats["requests"] == 0  # nothing went online
    assert batch["status"] == "done" and batch["ok"] == 40
    assert texts(tmp_path / "batch") == texts(tmp_path / "online")
    assert batch["cost_usd"] == pytest.approx(0.5 * online["cost_usd"], rel=1e-3)
    assert batch["prompt_tokens"] == online["prompt_tokens"]
    journal = (tmp_path / "batch" / "batches" / "journal.jsonl").read_bytes().splitlines()
    assert [orjson.loads(x)["ev"] for x in journal] == ["open", "creating", "submitted", "ended", "ingested"]

    # a rerun answers from the cache: no new batch
    again = await generate(inp, tmp_path / "batch", endpoint(sim, provider), progress=False, max_tokens=200)
    assert (
        again["skipped_existing"] == 40
        and len((tmp_path / "batch" / "batches" / "journal.jsonl").read_bytes().splitlines()) == 5
    )


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_expiry_item_5xx_and_truncated_download_go_to_a_second_round(tmp_path, provider):
    inp = write_input(tmp_path / "in.jsonl", 30)
    async with SimServer("default") as sim:
        sim.batch.faults = msgspec.convert(
            {"expire_at": 0.4, "p_item_5xx": 0.2, "truncate_results": 1, "batches": 1}, type(sim.batch.faults)
        )
        summary = await generate(
            inp, tmp_path / "out", endpoint(sim, provider), progress=False, max_tokens=200
        )
        stats = dict(sim.stats)
    assert summary["status"] == "done" and summary["ok"] == 30
    assert stats["batches_created"] == 2 and stats["batch_downloads_truncated"] == 1
    assert stats["batch_items_billed"] == 30  # each unique request paid once
    assert stats["batch_items"] - 30 == summary["batch"]["requeued"] > 0


async def test_max_rounds_one_fails_the_unanswered_records_with_exit_1(tmp_path):
    inp = write_input(tmp_path / "in.jsonl", 20)
    async with SimServer("default") as sim:
        sim.batch.faults = msgspec.convert({"expire_at": 0.4}, type(sim.batch.faults))
        rc, _, err = await fair(*cli_args(sim, "openai", inp, tmp_path / "out", "--batch-max-rounds", "1"))
        assert sim.stats["batches_created"] == 1
    assert rc == 1, err
    got = records(tmp_path / "out")
    failed = [r for r in got.values() if r["error"]]
    assert len(got) == 20 and len(failed) == 12
    assert "max_rounds = 1" in failed[0]["error"]


async def test_fallback_online_answers_what_the_batches_did_not(tmp_path):
    inp = write_input(tmp_path / "in.jsonl", 20)
    async with SimServer("default") as sim:
        sim.batch.faults = msgspec.convert({"expire_at": 0.5}, type(sim.batch.faults))
        cfg = endpoint(sim, "anthropic", max_rounds=1, fallback="online")
        summary = await generate(inp, tmp_path / "out", cfg, progress=False, max_tokens=200)
        assert sim.stats["requests"] == 10 and sim.stats["batch_items_billed"] == 10
    assert summary["ok"] == 20 and summary["batch"]["fallback_online"] == 10


# -- never pay twice ---------------------------------------------------------------------------


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_sigkill_after_submit_then_rerun_creates_no_second_batch(tmp_path, provider):
    inp = write_input(tmp_path / "in.jsonl", 30)
    out = tmp_path / "out"
    async with SimServer("default") as sim:
        sim.batch.faults = msgspec.convert({"start_s": 1.0}, type(sim.batch.faults))
        rc, _, _ = await fair(
            *cli_args(sim, provider, inp, out), kill_when=lambda: sim.stats["batches_created"] >= 1
        )
        assert rc == -signal.SIGKILL
        await asyncio.sleep(0.1)
        rc, _, err = await fair(*cli_args(sim, provider, inp, out))
        assert rc == 0, err
        assert sim.stats["batches_created"] == 1
        assert sim.stats["batch_items"] == sim.stats["batch_items_billed"] == 30  # billed == unique
    assert len(records(out)) == 30 and not any(r["error"] for r in records(out).values())
    assert read_manifest(out)["generate"]["batch"]["reattached"] == 1


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_lost_create_reply_is_found_live_and_after_a_kill_while_creating(tmp_path, provider):
    inp = write_input(tmp_path / "in.jsonl", 25)
    async with SimServer("default") as sim:
        # live: the create answers 500 but made the batch; the client finds it and attaches
        sim.batch.faults = msgspec.convert({"lose_create": 1}, type(sim.batch.faults))
        summary = await generate(
            inp, tmp_path / "live", endpoint(sim, provider), progress=False, max_tokens=200
        )
        assert summary["ok"] == 25 and summary["batch"]["creates_recovered"] == 1
        assert sim.stats["batches_created"] == 1 and sim.stats["batch_items_billed"] == 25

        # killed while creating (journal: creating, no submitted): the rerun finds it, no second batch
        sim.stats.reset()
        sim.batch.faults = msgspec.convert(
            {"lose_create": 1, "start_s": 0.5, "slow_list_s": 1.0}, type(sim.batch.faults)
        )
        out = tmp_path / "killed"
        inp = tmp_path / "in2.jsonl"  # other requests: the first batch cannot hold their answers
        inp.write_bytes(
            b"".join(orjson.dumps({"id": f"k{i}", "prompt": f"other {i}"}) + b"\n" for i in range(25))
        )
        rc, _, _ = await fair(
            *cli_args(sim, provider, inp, out), kill_when=lambda: sim.stats["batch_creates_lost"] >= 1
        )
        assert rc == -signal.SIGKILL
        events = [
            orjson.loads(x)["ev"] for x in (out / "batches" / "journal.jsonl").read_bytes().splitlines()
        ]
        assert events[-1] == "creating"
        rc, _, err = await fair(*cli_args(sim, provider, inp, out))
        assert rc == 0, err
        assert sim.stats["batches_created"] == 1 and sim.stats["batch_items_billed"] == 25
    assert len(records(out)) == 25


async def test_two_batches_matching_a_lost_anthropic_create_stop_with_exit_1(tmp_path):
    inp = write_input(tmp_path / "in.jsonl", 10)
    out = tmp_path / "out"
    async with SimServer("default") as sim:
        sim.batch.faults = msgspec.convert(
            {"lose_create": 1, "start_s": 5, "slow_list_s": 1.0}, type(sim.batch.faults)
        )
        rc, _, _ = await fair(
            *cli_args(sim, "anthropic", inp, out), kill_when=lambda: sim.stats["batch_creates_lost"] >= 1
        )
        assert rc == -signal.SIGKILL
        # someone else made a batch of the same size at the same time
        params = {"model": "sim", "max_tokens": 10, "messages": [{"role": "user", "content": "x"}]}
        async with aiohttp.ClientSession() as http:
            reqs = [{"custom_id": f"o{i}", "params": params} for i in range(10)]
            async with http.post(f"{sim.base_url}/messages/batches", json={"requests": reqs}) as r:
                assert r.status == 200
        rc, _, err = await fair(*cli_args(sim, "anthropic", inp, out))
        assert sim.stats["batches_created"] == 2
        assert rc == 1 and "fair batches attach" in err and "2 provider batches match" in err
        local = err.split("the create of batch ")[1].split(" ")[0]
        rc, listing, _ = await fair("batches", "list", str(out))
        assert rc == 0 and local in listing and "creating" in listing
        rc, _, err = await fair("batches", "attach", str(out), local, "msgbatch_sim000001")
        assert rc == 0, err
        sim.batch.faults = msgspec.convert({}, type(sim.batch.faults))
        other = sim.batch.batches["msgbatch_sim000002"]
        sim.batch.cancel(other)
        rc, _, err = await fair(*cli_args(sim, "anthropic", inp, out))
        assert rc == 0, err
        assert sim.stats["batches_created"] == 2 and len(records(out)) == 10


async def test_refused_credentials_on_a_control_call_abort_with_exit_3_and_no_key_in_the_run_dir(tmp_path):
    from fairdistill.engine.sim.profiles import load_profile

    secret = "sk-test-secret-key-0123456789"
    prof = msgspec.structs.replace(load_profile("default"), api_key=secret)
    inp = write_input(tmp_path / "in.jsonl", 10)
    async with SimServer(prof) as sim:
        for provider in PROVIDERS:
            out = tmp_path / provider
            rc, _, err = await fair(
                *cli_args(sim, provider, inp, out, "--api-key-env", "SIMKEY"), env={"SIMKEY": secret}
            )
            assert rc == 0, err
            bad = cli_args(sim, provider, inp, tmp_path / f"bad-{provider}", "--api-key-env", "SIMKEY")
            rc, _, err = await fair(*bad, env={"SIMKEY": "sk-wrong-key-999999999"})
            assert rc == 3 and "refused the credentials" in err and "sk-wrong" not in err
    for path in tmp_path.rglob("*"):
        if path.is_file():  # records, cache, trace, journal, results files, manifest
            data = path.read_bytes()
            assert secret.encode() not in data and b"sk-wrong-key" not in data, path


# -- the journal and bad input -----------------------------------------------------------------


async def test_journal_torn_last_line_is_cut_and_a_garbage_line_is_exit_2(tmp_path):
    from fairdistill.engine.request.batch.journal import Journal

    j = Journal(tmp_path)
    j.write("open", "L1", lane="default")
    j.close()
    with open(j.path, "ab") as f:
        f.write(b'{"ev": "creat')
    j2 = Journal(tmp_path)
    assert j2.batches["L1"].state == "open" and j.path.read_bytes().endswith(b"}\n")

    inp = write_input(tmp_path / "in.jsonl", 3)
    out = tmp_path / "out"
    (out / "batches").mkdir(parents=True)
    (out / "batches" / "journal.jsonl").write_bytes(b'{"ev":"open","local":"L","lane":"default"}\nnot json\n')
    async with SimServer("default") as sim:
        rc, _, err = await fair(*cli_args(sim, "openai", inp, out))
    assert rc == 2 and "journal.jsonl:2" in err


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--mode", "batcj"], "--mode"),
        (["--batch-linger", "0"], "--batch-linger"),
        (["--batch-max-items", "60000"], "batch.max_items = 60000 is above openai's limit 50000"),
        (["--batch-max-open", "1000"], "--batch-max-open"),
    ],
)
async def test_bad_batch_flags_are_exit_2_naming_the_field(tmp_path, flags, words):
    inp = write_input(tmp_path / "in.jsonl", 3)
    rc, _, err = await fair(
        "generate", "--endpoint", "http://127.0.0.1:9/v1", "--model", "m", "--input", str(inp),
        "--output", str(tmp_path / "o"), "--mode", "batch", *flags,
    )  # fmt: skip
    assert rc == 2 and words in err and "Traceback" not in err


def test_toml_batch_fields_are_checked_naming_the_endpoint_and_field(tmp_path):
    from fairdistill.engine.config import load_config
    from fairdistill.engine.errors import ConfigError

    base = (Path(__file__).parents[1] / "examples" / "sim-gsm8k.toml").read_text()
    for extra, words in [
        ('mode = "batcj"', "endpoints.gpt-sim: Invalid enum value 'batcj' - at `mode`"),
        ('mode = "batch"\nbatch = {linger_s = 0}', "at `batch.linger_s`"),
        ('provider = "anthropic"\nmode = "batch"\nbatch = {max_items = 200000}', "anthropic's limit 100000"),
        ('provider = "gemini"\nmode = "batch"\nbatch = {max_bytes = 300000000}', "at `batch.max_bytes`"),
    ]:
        path = tmp_path / "c.toml"
        path.write_text(base.replace('model = "gpt-sim"', f'model = "gpt-sim"\n{extra}'))
        with pytest.raises(ConfigError, match=None) as info:
            load_config(path)
        assert words in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_batches_cancel_then_rerun_collects_what_was_answered_and_pays_the_rest_once(
    tmp_path, provider
):
    inp = write_input(tmp_path / "in.jsonl", 20)
    out = tmp_path / "out"
    async with SimServer("default") as sim:
        sim.batch.faults = msgspec.convert({"start_s": 30}, type(sim.batch.faults))
        journal = out / "batches" / "journal.jsonl"

        def submitted() -> bool:  # killed once the journal knows the batch: cancel can reach it
            return journal.exists() and b'"submitted"' in journal.read_bytes()

        rc, _, _ = await fair(*cli_args(sim, provider, inp, out), kill_when=submitted)
        assert rc == -signal.SIGKILL
        rc, said, err = await fair("batches", "cancel", str(out))
        assert rc == 0 and "canceled" in said, err
        (batch,) = sim.batch.batches.values()
        assert batch.ended is not None
        sim.batch.faults = msgspec.convert({}, type(sim.batch.faults))
        rc, _, err = await fair(*cli_args(sim, provider, inp, out))
        assert rc == 0, err
        assert sim.stats["batches_created"] == 2 and sim.stats["batch_items_billed"] == 20
    assert len(records(out)) == 20
    rc, _, err = await fair("batches", "attach", str(out), "nope", "x")
    assert rc == 2 and "no batch 'nope'" in err


async def test_generate_in_batch_mode_holds_no_task_per_waiting_line(tmp_path):
    inp = write_input(tmp_path / "in.jsonl", 600)
    async with SimServer("default") as sim:
        sim.batch.faults = msgspec.convert({"start_s": 0.5}, type(sim.batch.faults))
        most = 0

        async def watch() -> None:
            nonlocal most
            while True:
                most = max(most, len(asyncio.all_tasks()))
                await asyncio.sleep(0.01)

        watcher = asyncio.create_task(watch())
        summary = await generate(
            inp, tmp_path / "out", endpoint(sim, "openai"), progress=False, max_tokens=50
        )
        watcher.cancel()
        assert sim.stats["batch_items"] == 600 and sim.stats["batches_created"] == 1
    assert summary["ok"] == 600 and summary["calls"] == 600 and summary["cost_usd"] > 0
    assert most < 40  # the server's handlers, the watcher, a few batch tasks: not 600
    trace = b"".join(p.read_bytes() for p in (tmp_path / "out" / "trace").iterdir())
    assert trace.count(b"\n") == 600


async def test_external_cancel_part_way_sends_the_rest_to_a_second_batch(tmp_path):
    inp = write_input(tmp_path / "in.jsonl", 20)
    async with SimServer("default") as sim:
        sim.batch.faults = msgspec.convert({"cancel_at": 0.3, "batches": 1}, type(sim.batch.faults))
        summary = await generate(
            inp, tmp_path / "out", endpoint(sim, "anthropic"), progress=False, max_tokens=50
        )
        assert sim.stats["batches_created"] == 2 and sim.stats["batch_items_billed"] == 20
    assert summary["ok"] == 20 and summary["batch"]["requeued"] == 14


async def test_ctrl_c_leaves_the_batch_running_says_so_and_the_rerun_collects_it(tmp_path):
    inp = write_input(tmp_path / "in.jsonl", 10)
    out = tmp_path / "out"
    async with SimServer("default") as sim:
        sim.batch.faults = msgspec.convert({"start_s": 1.5}, type(sim.batch.faults))
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "fairdistill",
            *cli_args(sim, "openai", inp, out),
            stderr=asyncio.subprocess.PIPE,
        )
        journal = out / "batches" / "journal.jsonl"
        while not (journal.exists() and b'"submitted"' in journal.read_bytes()):
            await asyncio.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        _, err = await proc.communicate()
        assert proc.returncode == 130
        assert "1 batch(es) still running at the provider" in err.decode() and "re-attach" in err.decode()
        (batch,) = sim.batch.batches.values()
        assert batch.ended is None  # left running, not canceled
        rc, _, err = await fair(*cli_args(sim, "openai", inp, out))
        assert rc == 0, err
        assert sim.stats["batches_created"] == 1 and sim.stats["batch_items_billed"] == 10


# -- one item per request: custom_id from the cache key ------------------------------------------


def _dup_input(path: Path, n: int, unique: int) -> Path:
    """``n`` lines asking ``unique`` different questions: identical requests wait at once."""
    path.write_bytes(
        b"".join(orjson.dumps({"id": f"d{i}", "prompt": f"question {i % unique}"}) + b"\n" for i in range(n))
    )
    return path


@pytest.mark.parametrize(("provider", "n"), [("openai", 1), ("anthropic", 2)])
async def test_identical_requests_are_one_item_and_a_rerun_after_sigkill_pays_none_again(
    tmp_path, provider, n
):
    """openai n=1 streams (engine.request.batch.feed); anthropic n=2 fans out through Engine.complete
    (single-flight on the cache key, parts named KEY-0, KEY-1)."""
    inp = _dup_input(tmp_path / "in.jsonl", 30, 10)
    out = tmp_path / "out"
    async with SimServer("default") as sim:
        sim.batch.faults = msgspec.convert({"start_s": 1.0}, type(sim.batch.faults))
        args = cli_args(sim, provider, inp, out, "--n", str(n), "--temperature", "0.7")
        rc, _, _ = await fair(*args, kill_when=lambda: sim.stats["batches_created"] >= 1)
        assert rc == -signal.SIGKILL
        await asyncio.sleep(0.1)
        rc, _, err = await fair(*args)
        assert rc == 0, err
        unique = 10 * n
        assert sim.stats["batches_created"] == 1
        assert sim.stats["batch_items"] == sim.stats["batch_items_billed"] == unique  # billed == unique
    got = records(out)
    assert len(got) == 30 and not any(r["error"] for r in got.values())
    assert all(len(r["texts"]) == n for r in got.values())
    assert not list((out / "batches").glob("*.input"))  # uploads are scratch files
    m = read_manifest(out)["generate"]  # the 20 repeats waited on their twin's item
    assert (m["batch"]["shared"] if provider == "openai" else m["cache_hits"]) == 20
    assert got["d3"]["texts"] == got["d13"]["texts"] == got["d23"]["texts"]  # one answer, shared
    journal = [orjson.loads(x) for x in (out / "batches" / "journal.jsonl").read_bytes().splitlines()]
    ids = next(e["ids"] for e in journal if e["ev"] == "creating")
    assert len(ids) == len(set(ids)) == unique
    assert all(len(c) <= 64 and c.replace("-", "").replace("_", "").isalnum() for c in ids)
    trace = [orjson.loads(x) for p in (out / "trace").iterdir() for x in p.read_bytes().splitlines()]
    (bid,) = {t["batch"] for t in trace if not t["cache_hit"]}  # every paid line names its batch
    assert bid and all("batch" not in t for t in trace if t["cache_hit"])


async def test_identical_concurrent_calls_share_one_send_online_too(tmp_path):
    from fairdistill.engine.request.client import Engine
    from fairdistill.engine.types import ChatRequest, Message

    req = ChatRequest(messages=[Message("user", "question 7")], max_tokens=50, temperature=0.7)
    async with SimServer("default") as sim:
        cfg = endpoint(sim, "openai", "online")
        async with Engine({"e": cfg}, cache_path=tmp_path / "cache.sqlite") as engine:
            got = await asyncio.gather(*(engine.complete("e", req) for _ in range(5)))
            other = await engine.complete("e", msgspec.structs.replace(req, sample_index=1))
        assert sim.stats["requests"] == 2  # five identical calls, one send; another sample, its own
    assert len({g.text for g in got}) == 1 and sum(not g.cached for g in got) == 1
    assert engine.stats["e"].calls == 2 and engine.stats["e"].cache_hits == 4
    assert other.cost_usd > 0 and not other.cached


async def test_a_lost_create_matching_two_running_batches_mid_run_stops_with_exit_1(tmp_path):
    """The live twin of the resume case above: exit 1 (a person must choose), not 3."""
    inp = write_input(tmp_path / "in.jsonl", 10)
    params = {"model": "sim", "max_tokens": 10, "messages": [{"role": "user", "content": "x"}]}
    async with SimServer("default") as sim:
        sim.batch.faults = msgspec.convert({"start_s": 30}, type(sim.batch.faults))
        async with aiohttp.ClientSession() as http:  # someone else's batch, same size, just before
            reqs = [{"custom_id": f"o{i}", "params": params} for i in range(10)]
            async with http.post(f"{sim.base_url}/messages/batches", json={"requests": reqs}) as r:
                assert r.status == 200
        sim.batch.faults = msgspec.convert({"lose_create": 1, "start_s": 30}, type(sim.batch.faults))
        rc, _, err = await fair(*cli_args(sim, "anthropic", inp, tmp_path / "out"))
        assert sim.stats["batches_created"] == 2
    assert rc == 1, err
    assert "2 provider batches match" in err and "fair batches attach" in err and "Traceback" not in err


async def test_when_the_first_of_identical_calls_is_cancelled_the_second_takes_its_item_over(tmp_path):
    from fairdistill.engine.request.batch.executor import BatchExecutor, Unmetered
    from fairdistill.engine.request.client import Engine
    from fairdistill.engine.types import ChatRequest, Message

    req = ChatRequest(messages=[Message("user", "question 8")], max_tokens=50)
    async with SimServer("default") as sim:
        sim.batch.faults = msgspec.convert({"start_s": 0.5}, type(sim.batch.faults))
        seams = {"executor": BatchExecutor(tmp_path), "admissions": {"e": Unmetered()}}
        cfg = endpoint(sim, "openai")
        async with Engine({"e": cfg}, cache_path=tmp_path / "c.sqlite", **seams) as engine:
            first = asyncio.create_task(engine.complete("e", req))
            second = asyncio.create_task(engine.complete("e", req))
            async with asyncio.timeout(10):
                while not sim.stats["batches_created"]:
                    await asyncio.sleep(0.01)
            first.cancel()
            done = await second
            again = await engine.complete("e", req)
        # the second caller took the submitted item over: one batch, one item billed
        assert sim.stats["batches_created"] == 1 and sim.stats["batch_items_billed"] == 1
    assert first.cancelled() and not done.cached and done.text and again.cached


# -- compact waiting requests (engine.request.batch.slots) ---------------------------------------


def test_slots_table_agrees_with_a_dict_through_adds_takes_and_reuse():
    """Fan-out parts share their digest; the table grows past its first size; backward-shift
    deletion keeps every remaining id findable; freed slots are reused."""
    import random

    from fairdistill.engine.request.batch.slots import OPEN, Slots, pack

    rng = random.Random(5)
    slots, model = Slots(), {}  # cid -> (slot, token)
    heads = [f"{rng.getrandbits(160):040x}" for _ in range(120)]  # up to 480 ids: a table near half full
    for step in range(30_000):
        cid = f"fd{rng.choice(heads)}" + rng.choice(["", "-0", "-1", "-12"])
        key = pack(cid)
        assert key is not None
        if cid in model and rng.random() < 0.6:
            slot, token = model.pop(cid)
            slots.batch[slot] = 1  # in a batch: taking it frees the slot
            assert slots.take(slot) == [(f"w{cid}", token)]
        elif cid not in model:
            assert slots.find(key) == -1
            model[cid] = (slots.add(key, f"w{cid}", step, pos=step, size=len(cid)), step)
        assert len(slots) == len(model)
    for cid, (slot, token) in model.items():
        assert slots.find(pack(cid)) == slot and slots.callers(slot) == [(f"w{cid}", token)]  # type: ignore[arg-type]
        assert slots.batch[slot] == OPEN
    assert len(slots.waiter) <= 480  # freed slots were reused
    assert sorted(slots.waiting()) == sorted(slot for slot, _ in model.values())


def test_slots_deletion_in_a_cluster_that_wraps_around_the_table_keeps_the_rest_findable():
    import itertools

    from fairdistill.engine.request.batch.slots import Slots

    counter = itertools.count()

    def key_at(home: int) -> bytes:  # a key whose probe starts at table index ``home``
        while hash(key := next(counter).to_bytes(24, "big")) & 1023 != home:
            pass
        return key

    keys = [key_at(1022), key_at(1022), key_at(1022), key_at(1023), key_at(0)]  # 1022, 1023, 0, 1, 2
    slots = Slots()
    for k in keys:
        slots.add(k, "w", 0, pos=0, size=1)
    for first in range(len(keys)):
        slots.batch[first] = 1
        slots.take(first)
        assert [slots.find(k) for k in keys] == [-1] * (first + 1) + list(range(first + 1, len(keys)))


def test_custom_ids_pack_round_trip_and_foreign_ids_are_not_ours():
    from fairdistill.engine.request.batch.slots import CidList, pack, unpack

    ids = [f"fd{i:040x}" for i in range(5)] + [f"fd{'ab' * 20}-0", f"fd{'cd' * 20}-123456789"]
    blob = b"".join(pack(c) for c in ids)  # type: ignore[misc]
    got = CidList(blob)
    assert list(got) == ids and got[-1] == ids[-1] and got[1:3] == ids[1:3] and len(got) == 7
    assert orjson.loads(got.json()) == ids and unpack(pack(ids[5])) == ids[5]  # type: ignore[arg-type]
    for foreign in (
        "o1",
        "fd" + "AB" * 20,
        "fd" + "ab" * 19,
        f"fd{'ab' * 20}-1234567890",
        f"fd{'ab' * 20}-x",
    ):
        assert pack(foreign) is None, foreign


async def test_batch_generate_counts_each_line_once_through_a_second_round_and_shared_items(tmp_path):
    """30 lines asking 10 questions, 60% of the first batch expiring: every line is requested,
    sent, answered and completed once (stats, trace), with the batch that answered it."""
    inp = _dup_input(tmp_path / "in.jsonl", 30, 10)
    out = tmp_path / "out"
    async with SimServer("default") as sim:
        sim.batch.faults = msgspec.convert({"expire_at": 0.4, "batches": 1}, type(sim.batch.faults))
        summary = await generate(inp, out, endpoint(sim, "openai"), progress=False, max_tokens=50)
        assert sim.stats["batches_created"] == 2 and sim.stats["batch_items_billed"] == 10
    assert summary["ok"] == 30 and summary["batch"]["shared"] == 20 and summary["batch"]["requeued"] == 6
    stats = read_manifest(out)["endpoints"]["default"]
    assert stats["requests"] == stats["calls"] == stats["ok"] == 30
    assert stats["in_flight"] == 0 and stats["errors"] == 0
    trace = [orjson.loads(x) for p in (out / "trace").iterdir() for x in p.read_bytes().splitlines()]
    assert len(trace) == 30 and len({t["batch"] for t in trace}) == 2
    got = records(out)
    assert all(got[f"d{i}"]["texts"] == got[f"d{i % 10}"]["texts"] for i in range(30))
