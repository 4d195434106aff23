"""Run directory: shards, torn-line recovery, dedup by id, manifest checksums."""

from __future__ import annotations

import hashlib

import orjson
import pytest

from fairdistill.engine.rundir.schema import Failure, Sample, Score
from fairdistill.engine.rundir.store import RunStore, iter_records, read_manifest, shard_paths


def _failure(i: int) -> Failure:
    return Failure(id=f"p{i}/failure/student", problem_id=f"p{i}", stage="student", reason="boom")


def test_write_dedups_by_id_and_rotates(tmp_path):
    store = RunStore(tmp_path, shard_records=3).open(["failures"])
    assert all(store.write("failures", _failure(i)) for i in range(7))
    assert not store.write("failures", _failure(2))
    store.close("done")
    names = [p.name for p in shard_paths(tmp_path, "failures")]
    assert names == ["shard-00000.jsonl", "shard-00001.jsonl", "shard-00002.jsonl"]
    assert [r.problem_id for r in iter_records(tmp_path, "failures")] == [f"p{i}" for i in range(7)]


def test_torn_partial_shard_is_cut_and_sealed_on_reopen(tmp_path):
    store = RunStore(tmp_path).open(["failures"])
    for i in range(3):
        store.write("failures", _failure(i))
    # simulate a SIGKILL in the middle of a write: half a line at the end, no close()
    partial = shard_paths(tmp_path, "failures")[0]
    assert partial.name.endswith(".partial")
    with open(partial, "ab") as f:
        f.write(b'{"id": "p3/failure/stu')
    again = RunStore(tmp_path).open(["failures"])
    assert set(again.ids("failures")) == {f"p{i}/failure/student" for i in range(3)}
    assert again.write("failures", _failure(3))
    assert not again.write("failures", _failure(1))
    again.close("done")
    paths = shard_paths(tmp_path, "failures")
    assert [p.name for p in paths] == ["shard-00000.jsonl", "shard-00001.jsonl"]
    for p in paths:  # every line of every sealed shard parses
        for line in p.read_bytes().splitlines():
            orjson.loads(line)


def test_manifest_lists_checksums_and_counts(tmp_path):
    store = RunStore(tmp_path).open(["failures", "samples"])
    store.write("failures", _failure(0))
    manifest = store.close("done", {"problems_total": 1})
    assert manifest == read_manifest(tmp_path)
    assert manifest["counts"] == {"failures": 1, "samples": 0}
    (shard,) = manifest["shards"]
    assert shard["sha256"] == hashlib.sha256((tmp_path / shard["path"]).read_bytes()).hexdigest()


def test_writers_share_a_run_directory(tmp_path):
    a = RunStore(tmp_path, writer="w0").open(["failures"])
    b = RunStore(tmp_path, writer="w1").open(["failures"])
    a.write("failures", _failure(0))
    b.write("failures", _failure(1))
    a.close("done")
    b.close("done")
    assert {r.id for r in iter_records(tmp_path, "failures")} == {"p0/failure/student", "p1/failure/student"}
    assert sorted(p.name for p in shard_paths(tmp_path, "failures")) == [
        "shard-w0-00000.jsonl",
        "shard-w1-00000.jsonl",
    ]


def test_samples_load_with_hf_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    from fairdistill.engine.rundir.schema import Msg

    store = RunStore(tmp_path).open(["samples"])
    for i in range(4):
        store.write(
            "samples",
            Sample(
                id=f"p{i}/sample/rationale/t",
                problem_id=f"p{i}",
                task="rationale" if i % 2 else "mistake",
                messages=[Msg("system", "s"), Msg("user", f"q{i}")],
                response="The answer is 4.",
                teacher="t",
                scores=[Score("a", 4), Score("b", None)],
            ),
        )
    store.close("done")
    files = [str(p) for p in shard_paths(tmp_path, "samples")]
    ds = datasets.load_dataset("json", data_files=files, split="train")
    assert ds.num_rows == 4
    assert ds[0]["scores"] == [{"reviewer": "a", "score": 4}, {"reviewer": "b", "score": None}]
