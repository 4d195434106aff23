"""Damaged and edited run directories (issue 20, "Records lost without a word").

Each test makes a real run directory with the real `fair generate` / `fair run` against the
simulator, damages it as a full disk, a hand edit or a newer fairdistill would, and runs the
real `fair` command: one set of rules (``engine.rundir.reader`` / ``verify``) for status and
every resume, exit 2 with one line naming the file, and after `fair repair` + resume every
record there exactly once.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from fairdistill.engine.rundir.store import iter_raw, shard_paths
from fairdistill.engine.sim import ModelProfile, SimProfile
from fairdistill.engine.sim.server import SimThread
from tests.test_bad_inputs import TEACHERS, clean, fair, job, one_error

REPO = Path(__file__).resolve().parents[1]
N = 12


@pytest.fixture(scope="module")
def sim():
    with SimThread("fast") as s:
        yield s


def _input(path: Path, n: int = N) -> Path:
    path.write_bytes(b"".join(orjson.dumps({"id": f"r{i}", "prompt": f"q {i}"}) + b"\n" for i in range(n)))
    return path


def gen(sim, inp: Path, out: Path, *extra: str):
    return fair(
        "generate", "--endpoint", sim.base_url, "--model", "m", "--input", str(inp), "--output", str(out),
        "--no-progress", *extra,
    )  # fmt: skip


def texts(out: Path) -> dict[str, list[str]]:
    rows = list(iter_raw(out, "responses"))
    by_id = {r["id"]: r["texts"] for r in rows}
    assert len(by_id) == len(rows), "a record was written twice"
    return by_id


EXPECTED = {f"r{i}": [f"echo: q {i}"] for i in range(N)}


@pytest.fixture
def done_gen(sim, tmp_path) -> tuple[Path, Path]:
    inp, out = _input(tmp_path / "in.jsonl"), tmp_path / "out"
    res = gen(sim, inp, out)
    assert res.rc == 0, res.err
    assert texts(out) == EXPECTED
    return inp, out


def _repair_and_resume(sim, inp: Path, out: Path) -> str:
    res = fair("repair", str(out))
    clean(res)
    assert res.rc == 0, res.err
    again = gen(sim, inp, out)
    assert again.rc == 0, again.err
    assert fair("status", str(out)).rc == 0
    assert texts(out) == EXPECTED  # nothing lost, nothing twice
    return res.err


# -- 3. a torn last line of a sealed shard: status and resume both call it damaged ---------------


@pytest.mark.parametrize("cmd", ["status", "resume"])
def test_torn_last_line_of_a_sealed_shard(sim, done_gen, cmd):
    inp, out = done_gen
    shard = shard_paths(out, "responses")[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: data.rstrip(b"\n").rfind(b"\n") + 1] + b'{"id": "r11", "te')  # a full disk
    res = fair("status", str(out)) if cmd == "status" else gen(sim, inp, out)
    one_error(res, 2, f"{shard}:{N}", "torn line", f"fair repair {out}")
    assert "quarantined" in _repair_and_resume(sim, inp, out)


def test_torn_last_line_stops_a_fair_run_resume(tmp_path):
    with SimThread(_fair_profile(), _problems()) as s:
        cfg = job(tmp_path, s.base_url, _data(tmp_path))
        run_dir = tmp_path / "run"
        assert fair("run", str(cfg), "--run-dir", str(run_dir), "--no-progress", deadline=120).rc == 0
        shard = shard_paths(run_dir, "attempts")[0]
        shard.write_bytes(shard.read_bytes()[:-5])
        n = shard.read_bytes().count(b"\n") + 1
        for res in (
            fair("status", str(run_dir)),
            fair("run", str(cfg), "--run-dir", str(run_dir), "--no-progress", deadline=120),
        ):
            one_error(res, 2, f"{shard}:{n}", f"fair repair {run_dir}")


# -- 4. a record line deleted from a sealed shard: its sha256 no longer matches ------------------


@pytest.mark.parametrize("cmd", ["status", "resume"])
def test_a_deleted_line_is_a_changed_shard(sim, done_gen, cmd):
    inp, out = done_gen
    shard = shard_paths(out, "responses")[0]
    lines = shard.read_bytes().splitlines(keepends=True)
    shard.write_bytes(b"".join(lines[:3] + lines[4:]))  # every line left is a good record
    res = fair("status", str(out)) if cmd == "status" else gen(sim, inp, out)
    one_error(res, 2, str(shard), "changed since manifest.json", f"fair repair {out}")
    err = _repair_and_resume(sim, inp, out)
    assert f"{shard.relative_to(out)}: changed since it was recorded" in err


def test_a_deleted_sample_is_redone_after_repair(tmp_path):
    """FAIR run: a `samples` line deleted. Its problem's marker says more samples than are left:
    repair takes the marker away (saying so), the resume redoes that problem from the cache."""
    with SimThread(_fair_profile(), _problems()) as s:
        cfg = job(tmp_path, s.base_url, _data(tmp_path))
        ref, run_dir = tmp_path / "ref", tmp_path / "run"
        for d in (ref, run_dir):
            assert fair("run", str(cfg), "--run-dir", str(d), "--no-progress", deadline=120).rc == 0
        want = _records(ref)
        assert want["samples"], "the profile must give samples"
        shard = shard_paths(run_dir, "samples")[0]
        lines = shard.read_bytes().splitlines(keepends=True)
        shard.write_bytes(b"".join(lines[1:]))
        one_error(fair("status", str(run_dir)), 2, str(shard), "changed since manifest.json")
        one_error(fair("run", str(cfg), "--run-dir", str(run_dir), "--no-progress"), 2, str(shard))
        res = fair("repair", str(run_dir))
        clean(res)
        assert res.rc == 0 and "1 problems will be redone" in res.err, res.err
        res = fair("run", str(cfg), "--run-dir", str(run_dir), "--no-progress", deadline=120)
        assert res.rc == 0, res.err
    assert _records(run_dir) == want


# -- 5. a newer schema_version is refused by every reader -----------------------------------------


@pytest.mark.parametrize("cmd", ["status", "resume", "export", "repair", "train"])
def test_newer_schema_version_is_refused(sim, done_gen, tmp_path, cmd):
    inp, out = done_gen
    manifest = orjson.loads((out / "manifest.json").read_bytes())
    (out / "manifest.json").write_bytes(orjson.dumps({**manifest, "schema_version": 7}))
    before = {p: p.read_bytes() for p in shard_paths(out, "responses")}
    argv = {
        "status": ["status", str(out)],
        "export": ["export", str(out), "--format", "trl", "--out", str(tmp_path / "x")],
        "repair": ["repair", str(out)],
        "train": ["train", str(out), "--out", str(tmp_path / "t")],
    }
    res = gen(sim, inp, out) if cmd == "resume" else fair(*argv[cmd])
    one_error(res, 2, "manifest.json", "schema_version 7", "schema_version 1")
    assert {p: p.read_bytes() for p in shard_paths(out, "responses")} == before  # nothing rewritten


def test_a_newer_record_is_refused(sim, done_gen):
    inp, out = done_gen
    (out / "manifest.json").unlink()  # a run killed before its first manifest
    shard = shard_paths(out, "responses")[0]
    lines = shard.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b'"schema_version":1', b'"schema_version":2')
    shard.write_bytes(b"".join(lines))
    for res in (fair("status", str(out)), gen(sim, inp, out)):
        one_error(res, 2, f"{shard}:2", "schema_version 2", "schema_version 1")


# -- 7. status on bad trace lines; a closed pipe -------------------------------------------------


@pytest.mark.parametrize(
    "edit", [lambda t: t.pop("endpoint"), lambda t: t.update(cost_usd="free"), lambda t: t.update(endpoint=5)]
)
def test_a_bad_trace_line_is_named_and_repaired(sim, done_gen, edit):
    """Decided: a trace line status cannot count is damage like a bad record (exit 2, named),
    not skipped: the cost it holds would be missing from the report without a word."""
    _, out = done_gen
    shard = shard_paths(out, "trace")[0]
    lines = shard.read_bytes().splitlines(keepends=True)
    t = orjson.loads(lines[2])
    edit(t)
    lines[2] = orjson.dumps(t) + b"\n"
    shard.write_bytes(b"".join(lines))
    one_error(fair("status", str(out)), 2, f"{shard}:3", f"fair repair {out}")
    res = fair("repair", str(out))
    assert res.rc == 0 and f"{shard.relative_to(out)}:3" in res.err, res.err
    assert fair("status", str(out)).rc == 0


def test_status_into_a_closed_pipe_is_quiet(done_gen):
    _, out = done_gen
    proc = subprocess.Popen(
        [sys.executable, "-m", "fairdistill", "status", str(out)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    proc.stdout.close()  # `| head` that has gone already
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 141 and err == b"", err


# -- 8. a kind directory that cannot be written ----------------------------------------------------


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_responses_dir(sim, done_gen):
    inp, out = done_gen
    (out / "responses").chmod(0o555)
    try:
        one_error(gen(sim, _input(inp, N + 3), out), 2, str(out / "responses"), "not writable")
    finally:
        (out / "responses").chmod(0o755)


def test_a_file_where_the_responses_folder_goes(sim, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "responses").write_text("x")
    one_error(gen(sim, _input(tmp_path / "in.jsonl"), out), 2, str(out / "responses"))


# -- 1. and 6. the block plan and --workers (checked before Ray starts) ---------------------------


def _planned(sim, tmp_path) -> tuple[Path, Path, Path]:
    """A `--ray` run directory holding only its plan: `--workers 100000` is refused at once, after
    the plan is written and before Ray starts."""
    inp, out = _input(tmp_path / "in.jsonl", 10), tmp_path / "out"
    res = gen(sim, inp, out, "--ray", "local", "--workers", "100000", "--block-size", "3")
    one_error(res, 2, "--workers 100000", "room for")
    plan = out / "blocks" / "plan.json"
    assert len(orjson.loads(plan.read_bytes())["blocks"]) == 4
    return inp, out, plan


PLAN_EDITS = {
    "offset": (lambda p: p["blocks"][1].update(offset=0), "`offset`"),
    "start": (lambda p: p["blocks"][2].update(start=1), "`start`"),
    "skip": (lambda p: p["blocks"][0].update(skip=[2]), "`skip`"),
    "count": (lambda p: p["blocks"][0].update(count=4), "other ids"),
    "digest": (lambda p: p["blocks"][3].update(ids_sha256="0" * 64), "other ids"),
    "dropped-block": (lambda p: p["blocks"].pop(1), "blocks"),
    "block-size-0": (lambda p: p.update(block_size=0), "block_size"),
    "block-size-str": (lambda p: p.update(block_size="3"), "block_size"),
    "negative-offset": (lambda p: p["blocks"][1].update(offset=-5), "offset"),
    "items": (lambda p: p.update(items=99), "`items`"),
    "not-a-plan": (lambda p: p.clear(), "plan"),
}


@pytest.mark.parametrize("edit", PLAN_EDITS)
def test_an_edited_plan_is_refused_before_any_block_runs(sim, tmp_path, edit):
    inp, out, plan = _planned(sim, tmp_path)
    data = orjson.loads(plan.read_bytes())
    change, needle = PLAN_EDITS[edit]
    change(data)
    plan.write_bytes(orjson.dumps(data))
    one_error(gen(sim, inp, out, "--ray", "local"), 2, "plan.json", needle)
    assert not (out / "responses").exists() or not shard_paths(out, "responses")


# -- helpers for FAIR runs ---------------------------------------------------------------------------


def _problems():
    from fairdistill.engine.rundir.schema import Problem

    return [
        Problem(id=f"p{i}", question=f"Ann has {i + 3} pens and buys {2 * i + 1} more. How many pens?",
                answer=str(3 * i + 4), task="numeric", dataset="t")
        for i in range(4)
    ]  # fmt: skip


def _data(tmp_path: Path) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_bytes(
        b"".join(
            orjson.dumps({"id": p.id, "question": p.question, "answer": p.answer}) + b"\n"
            for p in _problems()
        )
    )
    return path


def _fair_profile() -> SimProfile:
    models = {t: ModelProfile(content="reasoning", skill=0.9, leniency=0.3) for t in TEACHERS}
    models["student"] = ModelProfile(content="reasoning", role="student", skill=0.2)
    return SimProfile(name="dmg", seed=5, models=models)


def _records(run_dir: Path) -> dict[str, dict[str, dict]]:
    out = {}
    for kind in ("attempts", "rationales", "feedback", "reviews", "samples", "problems"):
        rows = list(iter_raw(run_dir, kind))
        out[kind] = {r["id"]: {k: v for k, v in r.items() if k != "calls"} for r in rows}
        assert len(out[kind]) == len(rows), f"duplicate {kind} records"
    return out
