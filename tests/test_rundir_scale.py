"""A run directory at scale: the compact resume index saved beside the manifest, the rerun of a
finished `fair generate` that reads nothing, and `run.compress = "zstd"` read by every reader."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import orjson
from fakeserver import write_input

from fairdistill.engine.rundir import index as idindex
from fairdistill.engine.rundir.reader import sha256
from fairdistill.engine.rundir.schema import Problem, Response
from fairdistill.engine.rundir.store import RunStore, iter_raw, read_manifest, shard_paths
from fairdistill.engine.sim import ModelProfile, SimProfile, start_sim


def _write(root: Path, ids: range, writer: str = "", compress: str = "none") -> None:
    store = RunStore(root, writer=writer, shard_records=1000, compress=compress).open(["responses"])
    for i in ids:
        store.write("responses", Response(id=f"r{i}", texts=[f"answer {i}"], finish_reasons=["stop"]))
    store.close("done")


def test_the_resume_index_is_saved_sealed_with_the_digests_and_read_back(tmp_path):
    _write(tmp_path, range(3500))
    manifest = read_manifest(tmp_path)
    hashes, covered = idindex.load(tmp_path, "responses", manifest, shard_paths(tmp_path, "responses"))
    assert len(hashes) == 3500 and covered == {s["path"] for s in manifest["shards"]}
    store = RunStore(tmp_path).open(["responses"])
    ids = store.ids("responses")
    assert all(store.has("responses", f"r{i}") for i in range(3500)) and "r3500" not in ids
    assert store.count("responses") == 3500 and set(ids) == {f"r{i}" for i in range(3500)}
    assert ids.hashes.nbytes() <= 16 * 3500  # the budget: 16 bytes an id (a set of str: ~100+)


def test_an_index_that_does_not_fit_the_shards_is_ignored_and_they_are_read(tmp_path):
    _write(tmp_path, range(1500))
    old = idindex.index_path(tmp_path, "responses").read_bytes()
    _write(tmp_path, range(1500, 2600), writer="w2")  # another writer's shards, a new index
    idindex.index_path(tmp_path, "responses").write_bytes(old)  # an older index: covers less
    assert RunStore(tmp_path).open(["responses"]).count("responses") == 2600
    manifest = read_manifest(tmp_path)
    manifest["shards"][0]["sha256"] = "0" * 64  # an index sealed with other digests: not used
    (tmp_path / "manifest.json").write_bytes(orjson.dumps(manifest))
    paths = shard_paths(tmp_path, "responses")
    assert idindex.load(tmp_path, "responses", manifest, paths)[1] == set()
    idindex.index_path(tmp_path, "responses").write_bytes(b"FAIRIDX1garbage")
    assert idindex.load(tmp_path, "responses", manifest, paths)[1] == set()
    store = RunStore(tmp_path).open(["responses"])
    assert store.count("responses") == 2600 and store.has("responses", "r2599")


def test_a_compressed_shard_whose_source_survived_a_kill_is_read_once(tmp_path):
    _write(tmp_path, range(2500), compress="zstd")
    zst = sorted(p.name for p in (tmp_path / "responses").iterdir())
    assert zst == [f"shard-0000{i}.jsonl.zst" for i in range(3)]
    # a kill between the .zst's rename and the removal of its source leaves both
    first = shard_paths(tmp_path, "responses")[0]
    lines = [orjson.dumps(r) + b"\n" for r in list(iter_raw(tmp_path, "responses"))[:1000]]
    first.with_name("shard-00000.jsonl.partial").write_bytes(b"".join(lines))
    assert len(list(iter_raw(tmp_path, "responses"))) == 2500
    assert RunStore(tmp_path).open(["responses"]).count("responses") == 2500


async def _fair(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fairdistill",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    return proc.returncode, err.decode()


def _echo() -> SimProfile:
    return SimProfile(name="t", seed=1, default_model="m", models={"m": ModelProfile(latency_ms=0)})


async def test_a_rerun_of_a_finished_generate_run_sends_nothing_and_keeps_its_outcome(tmp_path):
    inp = write_input(tmp_path / "in.jsonl", 200, extra=[b'{"id": "r3", "prompt": "again"}', b"not json"])
    out = tmp_path / "out"
    async with start_sim(_echo()) as sim:
        args = ["generate", "--endpoint", sim.base_url, "--model", "m", "--input", str(inp),
                "--output", str(out), "--no-progress"]  # fmt: skip
        rc, err = await _fair(*args)
        assert rc == 1 and "1 input lines were bad" in err and "1 input lines repeated" in err
        paid = sim.stats["requests"]
        rc, err2 = await _fair(*args)  # the same input, finished: nothing read, nothing sent
        assert rc == 1 and "(0 new ok, 200 already there)" in err2 and "1 input lines repeated" in err2
        assert sim.stats["requests"] == paid
        with open(inp, "ab") as f:  # the input changed: it is read again, only the new line sent
            f.write(b'{"id": "new", "prompt": "q"}\n{"id": "r7", "prompt": "dup of a written id"}\n')
        rc, err3 = await _fair(*args)
        assert sim.stats["requests"] == paid + 1 and "(1 new ok, 200 already there)" in err3
        assert rc == 1 and "2 input lines repeated an earlier id" in err3, err3
    assert len(list(iter_raw(out, "responses"))) == 201


async def test_zstd_generate_run_is_read_by_status_repair_resume_and_datasets(tmp_path):
    import datasets

    inp = write_input(tmp_path / "in.jsonl", 300)
    async with start_sim(_echo()) as sim:
        base = ["generate", "--endpoint", sim.base_url, "--model", "m", "--input", str(inp), "--no-progress"]
        assert (await _fair(*base, "--output", str(tmp_path / "plain")))[0] == 0
        out = tmp_path / "z"
        assert (await _fair(*base, "--output", str(out), "--compress", "zstd"))[0] == 0
        paid = sim.stats["requests"]
        (inp).write_bytes(inp.read_bytes() + b'{"id": "one-more", "prompt": "q"}\n')
        rc, err = await _fair(*base, "--output", str(out), "--compress", "zstd")  # resume over .zst
        assert rc == 0 and "(1 new ok, 300 already there)" in err and sim.stats["requests"] == paid + 1
    for kind in ("responses", "trace"):
        names = [p.name for p in (out / kind).iterdir()]
        assert names and all(n.endswith(".jsonl.zst") for n in names), names
    plain = sum(p.stat().st_size for p in (tmp_path / "plain" / "responses").iterdir())
    packed = sum(p.stat().st_size for p in (out / "responses").iterdir())
    assert packed * 3 < plain
    assert (await _fair("status", str(out)))[0] == 0
    rc, err = await _fair("repair", str(out))
    assert rc == 0 and "0 lines quarantined" in err
    rows = {r["id"]: r["texts"] for r in iter_raw(out, "responses")}
    assert (
        len(rows) == 301
        and rows["r5"] == {r["id"]: r["texts"] for r in iter_raw(tmp_path / "plain", "responses")}["r5"]
    )
    files = [str(p) for p in (out / "responses").iterdir()]
    assert len(datasets.load_dataset("json", data_files=files, split="train")) == 301


def _question(i: int) -> str:
    return f"Ann has {i + 3} pens and buys {2 * i + 1} more. How many pens?"


def _job(tmp_path: Path, base_url: str, compress: str) -> Path:
    data = tmp_path / "problems.jsonl"
    data.write_bytes(b"".join(
        orjson.dumps({"id": f"p{i:03d}", "question": _question(i), "answer": str(3 * i + 4)}) + b"\n"
        for i in range(40)))  # fmt: skip
    names = ["t-good", "t-mid", "t-harsh", "student"]
    eps = "".join(f'[endpoints.{n}]\nbase_url = "{base_url}"\nmodel = "{n}"\n' for n in names)
    job = tmp_path / f"job-{compress}.toml"
    job.write_text(
        f'[run]\nseed = 3\nmax_in_flight = 8\nshard_records = 7\ncompress = "{compress}"\n'
        f'[dataset]\nname = "jsonl"\npath = "{data}"\ntask = "numeric"\n'
        '[student]\nendpoint = "student"\nattempts = 2\ntemperature = 0.7\n'
        '[teachers]\nendpoints = ["t-good", "t-mid", "t-harsh"]\n' + eps
    )
    return job


async def test_a_killed_zstd_fair_run_resumes_from_compressed_shards_to_the_same_samples(tmp_path):
    models = {
        "t-good": ModelProfile(content="reasoning", skill=0.9, leniency=0.3, latency_ms=15),
        "t-mid": ModelProfile(content="reasoning", skill=0.7, leniency=0.0, latency_ms=15),
        "t-harsh": ModelProfile(content="reasoning", skill=0.8, leniency=-0.8, latency_ms=15),
        "student": ModelProfile(content="reasoning", role="student", skill=0.4, latency_ms=15),
    }
    probs = [
        Problem(id=f"p{i:03d}", question=_question(i), answer=str(3 * i + 4), task="numeric")
        for i in range(40)
    ]
    async with start_sim(SimProfile(name="t", seed=7, models=models), problems=probs) as sim:
        ref, out = tmp_path / "ref", tmp_path / "out"
        assert (await _fair("run", str(_job(tmp_path, sim.base_url, "none")), "--run-dir", str(ref),
                            "--no-progress"))[0] == 0  # fmt: skip
        job = _job(tmp_path, sim.base_url, "zstd")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "fairdistill", "run", str(job), "--run-dir", str(out), "--no-progress",
            stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        while proc.returncode is None and len(list((out / "attempts").glob("*.zst"))) < 3:
            await asyncio.sleep(0.01)
        if proc.returncode is None:
            proc.send_signal(signal.SIGKILL)
        await proc.wait()
        assert proc.returncode == -signal.SIGKILL, "the run finished before the kill"
        assert (await _fair("run", str(job), "--run-dir", str(out), "--no-progress"))[0] == 0
    names = sorted(p.name for p in (out / "attempts").iterdir())
    assert any(n.endswith(".jsonl.zst") for n in names) and not any(n.endswith(".partial") for n in names)
    samples = {r["id"]: r["response"] for r in iter_raw(out, "samples")}
    assert samples and samples == {r["id"]: r["response"] for r in iter_raw(ref, "samples")}
    rc, err = await _fair("export", str(out), "--format", "trl", "--out", str(tmp_path / "exp"))
    assert rc == 0, err
    assert os.listdir(tmp_path / "exp")


async def test_bench_rundir_reports_its_stable_keys_and_one_verdict_per_target():
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fairdistill", "bench", "rundir", "--quick", "--json", "--records", "3000",
        "--lines", "400", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    result = orjson.loads(out.decode().strip().splitlines()[-1])
    assert proc.returncode == result["exit_code"], err.decode()[-2000:]
    syn, gen = result["synthetic"], result["generate"]
    assert set(syn) == {"none", "zstd"} and all(a["ids_ok"] for a in syn.values())
    assert syn["zstd"]["disk_bytes_per_record"] * 5 < syn["none"]["disk_bytes_per_record"]
    assert all(a["index_load_s"] > 0 and a["index_bytes_per_id"] <= 16 for a in syn.values())
    assert gen["first_run_rc"] == gen["rerun_rc"] == gen["resume_one_new_line_rc"] == gen["status_rc"] == 0
    assert set(result["verdicts"]) == {"index_bytes_per_id", "synthetic_ids_ok", "generate_ok", "rerun_s",
                                       "status_s", "disk_bytes_per_record_zstd"}  # fmt: skip
    assert gen["rerun_peak_rss_mb"] and gen["rerun_s"] < gen["first_run_s"]


async def test_compress_with_ray_is_refused_rather_than_ignored(tmp_path):
    inp = write_input(tmp_path / "in.jsonl", 3)
    flags = ["--input", str(inp), "--output", str(tmp_path / "o"), "--compress", "zstd", "--ray"]
    rc, err = await _fair("generate", "--endpoint", "http://127.0.0.1:9/v1", "--model", "m", *flags)
    assert rc == 2 and "--compress is not supported with --ray" in err and "Traceback" not in err


def test_hash_sets_stay_under_16_bytes_an_id_however_they_are_sized_or_read():
    import io

    from fairdistill.engine.rundir.idset import HashSet64, id_hash

    hashes = [id_hash(f"id-{i}") for i in range(20_000)]
    for expected in (0, 20_000, 5_000_000):  # unknown, right, far too high (a guess from bytes)
        s = HashSet64.build(hashes + hashes[:50], expected)
        assert len(s) == 20_000 and s.nbytes() <= 16 * 20_000
        assert all(h in s for h in hashes[::97]) and id_hash("absent") not in s
    raw = s.to_bytes()
    back = HashSet64.from_file(io.BytesIO(raw), len(s), chunk=777)  # chunks cut buckets anywhere
    assert back.to_bytes() == raw and back.nbytes() <= 16 * 20_000


async def _status(run_dir: Path) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fairdistill", "status", str(run_dir),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    return proc.returncode or 0, out.decode() + err.decode()


async def test_status_sums_the_saved_trace_totals_and_reads_a_shard_they_no_longer_fit(tmp_path):
    inp = write_input(tmp_path / "in.jsonl", 150)
    out = tmp_path / "out"
    async with start_sim(_echo()) as sim:
        rc, err = await _fair("generate", "--endpoint", sim.base_url, "--model", "m", "--input", str(inp),
                              "--output", str(out), "--no-progress")  # fmt: skip
        assert rc == 0, err
    (shard,) = shard_paths(out, "trace")
    saved = out / "index" / "trace" / f"{shard.name}.json"
    totals = orjson.loads(saved.read_bytes())
    assert totals["totals"]["lines"] == sum(row[2] for row in totals["totals"]["rows"]) == 150  # calls
    rc, summed = await _status(out)
    assert rc == 0 and "| API calls (cache hits) | 150 (0) |" in summed, summed
    saved.unlink()  # no saved totals: the shard is read line by line, to the same figures
    rc, read = await _status(out)
    assert rc == 0 and read == summed
    saved.write_bytes(orjson.dumps(totals))
    line = orjson.loads(shard.read_bytes().splitlines()[0])
    with open(shard, "ab") as f:  # the shard changed after its totals were saved: they are stale
        f.write(orjson.dumps({**line, "prompt_tokens": 1000}) + b"\n")
    rc, stale = await _status(out)
    assert rc == 0 and "| API calls (cache hits) | 151 (0) |" in stale, stale
    with open(shard, "ab") as f:  # and a bad line in it is damage, saved totals or not
        f.write(orjson.dumps({**line, "endpoint": 5}) + b"\n")
    rc, bad = await _status(out)
    assert rc == 2 and f"{shard}:152" in bad and f"fair repair {out}" in bad, bad


async def test_status_names_a_line_torn_before_its_shard_was_sealed_and_listed(tmp_path):
    """A short write on a full disk, then the seal and a manifest with that shard's sha256:
    the digest matches, yet the torn line is damage, named (the digest alone is not trusted)."""
    _write(tmp_path, range(1500))
    shard = shard_paths(tmp_path, "responses")[1]
    shard.write_bytes(shard.read_bytes()[:-1])
    manifest = read_manifest(tmp_path)
    for entry in manifest["shards"]:
        if entry["path"] == str(shard.relative_to(tmp_path)):
            entry.update(sha256=sha256(shard), bytes=shard.stat().st_size)
    (tmp_path / "manifest.json").write_bytes(orjson.dumps(manifest))
    rc, said = await _status(tmp_path)
    assert rc == 2 and f"{shard}:500" in said and "torn line" in said, said
