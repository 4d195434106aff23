"""Scale-out on Ray (engine.scale): same records as one process, and the faults of issue 12.

Every run is the real `fair` command in a child process against `tests/fakeserver.py` over
loopback. Cluster tests share one Ray head started here (`ray start --head --block` in its own
process group on 127.0.0.1, killed by its process group at teardown; never `ray stop`).
Faults are real: workers, the limiter and the driver are SIGKILLed by the pids they publish in
`RUN_DIR/blocks/pids/`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest
from fakeserver import FakeServer, FakeServerThread, records, write_input

from fairdistill.engine.cli import main
from fairdistill.engine.rundir.store import iter_raw, read_manifest

pytest.importorskip("ray")

REPO = Path(__file__).resolve().parents[1]
# Ray rewrites a 127.0.0.1 address to the host's IP before joining; this keeps a one-machine
# test cluster on loopback (head and drivers alike).
LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
PY = sys.executable


def _free_port(lo: int = 19700, hi: int = 19720) -> int:
    for port in range(lo, hi):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {lo}-{hi - 1}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A 2-CPU Ray head on 127.0.0.1; yields its address. No API key in its environment."""
    port = _free_port()
    temp = Path(f"/tmp/fair-ray-{port}")  # short: Ray's socket paths must fit 107 bytes
    env = {k: v for k, v in os.environ.items() if k not in ("FAIR_SCALE_KEY", "RAY_ADDRESS")} | LOOPBACK
    log = tmp_path_factory.mktemp("ray") / "head.log"
    cmd = [
        str(Path(PY).parent / "ray"), "start", "--head", "--block", "--num-cpus", "2",
        "--port", str(port), "--node-ip-address", "127.0.0.1", "--include-dashboard", "false",
        "--disable-usage-stats", "--temp-dir", str(temp),
        "--min-worker-port", "19720", "--max-worker-port", "19799",  # our range, not 10002-19999
    ]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"ray start exited {proc.returncode}: {log.read_text()[-2000:]}")
            if "Ray runtime started" in log.read_text(errors="replace"):
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"ray head did not start in 90 s: {log.read_text()[-2000:]}")
        yield address
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(3)
        with contextlib.suppress(ProcessLookupError):  # what SIGTERM left of the group (gcs, workers)
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        shutil.rmtree(temp, ignore_errors=True)


def _args(srv: FakeServer, inp: Path, out: Path, *extra: str) -> list[str]:
    return ["generate", "--endpoint", srv.url, "--model", "m", "--input", str(inp), "--output", str(out),
            "--no-progress", *extra]  # fmt: skip


def fair(
    *args: str, env: dict | None = None, watch: Callable[[], bool] | None = None, timeout: float = 240
) -> tuple[int, str]:
    """`fair ARGS` in a child (own process group, killed with it); ``watch()`` is polled while it
    runs, and the child is SIGKILLed when it returns True."""
    proc = subprocess.Popen(
        [PY, "-m", "fairdistill", *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, **LOOPBACK, **(env or {})}, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            if watch is not None and watch():
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.05)
        if proc.poll() is None and time.monotonic() >= deadline:
            os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, err.decode()


def block_lines(out: Path, block: str) -> int:
    return sum(p.read_bytes().count(b"\n") for p in (out / "responses").glob(f"shard-{block}.*"))


def expected(n: int) -> dict[str, list[str]]:
    return {f"r{i}": [f"echo: question {i}"] for i in range(n)}


def texts(out: Path) -> dict[str, list[str]]:
    return {k: v["texts"] for k, v in records(out).items()}


def kill_pid_file(path: Path) -> bool:
    try:
        pid = int(path.read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    return True


# -- without a cluster --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--ray", "--workers", "0"], "--workers"),
        (["--ray", "ray://10.0.0.1:10001"], "ray://"),
        (["--ray", "10.0.0.1"], "HOST:PORT"),
        (["--ray", "host:99999"], "HOST:PORT"),
        (["--workers", "2"], "--workers needs --ray"),
        (["--block-size", "10"], "--block-size needs --ray"),
        (["--ray", "--mode", "batch"], "--mode batch"),
    ],
)
def test_bad_ray_arguments_exit_2(tmp_path: Path, capsys, extra: list[str], needle: str) -> None:
    inp = write_input(tmp_path / "in.jsonl", 3)
    code = main(["generate", "--endpoint", "http://127.0.0.1:9/v1", "--model", "m", "--input", str(inp),
                 "--output", str(tmp_path / "out"), "--no-progress", *extra])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2, err
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_ray_not_installed_exit_2(tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    inp = write_input(tmp_path / "in.jsonl", 3)
    code = main(["generate", "--endpoint", "http://127.0.0.1:9/v1", "--model", "m", "--input", str(inp),
                 "--output", str(tmp_path / "out"), "--no-progress", "--ray"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "pip install 'fairdistill[ray]'" in err, err


def test_single_process_run_dir_refused_with_ray(tmp_path: Path, capsys) -> None:
    inp = write_input(tmp_path / "in.jsonl", 5)
    out = tmp_path / "out"
    with FakeServerThread() as srv:
        assert main(_args(srv, inp, out)) == 0
        capsys.readouterr()
        code = main(_args(srv, inp, out, "--ray"))
    err = capsys.readouterr().err
    assert code == 2 and "single-process run" in err, err


def test_local_ray_same_records_as_single_process(tmp_path: Path) -> None:
    """`--ray local` starts Ray in the driver; 3 blocks over 2 workers; same records."""
    inp = write_input(tmp_path / "in.jsonl", 250, extra=[b"not json", b'{"id": "r3", "prompt": "dup"}'])
    with FakeServerThread() as srv:
        code1, err1 = fair(*_args(srv, inp, tmp_path / "single"))
        code2, err2 = fair(*_args(srv, inp, tmp_path / "ray", "--ray", "local", "--workers", "2",
                                  "--block-size", "100"))  # fmt: skip
    assert (code1, code2) == (1, 1), (err1, err2)  # the bad and the repeated line, as single-process
    assert "input lines were bad" in err2 and "repeated an earlier id" in err2
    assert texts(tmp_path / "ray") == texts(tmp_path / "single") == expected(250)
    manifest = read_manifest(tmp_path / "ray")
    assert manifest["counts"] == {"responses": 250} and manifest["ray"]["blocks"] == 3
    assert {p.name for p in (tmp_path / "ray" / "cache").iterdir()} == {f"b0000{i}.sqlite" for i in range(3)}
    assert not (tmp_path / "ray" / "cache.sqlite").exists()


# -- on the module's cluster ----------------------------------------------------------------------


def test_cluster_run_resume_and_changed_input(cluster: str, tmp_path: Path) -> None:
    inp = write_input(tmp_path / "in.jsonl", 200)
    out = tmp_path / "out"
    with FakeServerThread() as srv:
        code, err = fair(*_args(srv, inp, out, "--ray", cluster, "--block-size", "50"))
        assert code == 0, err
        assert texts(out) == expected(200)
        assert len(srv.seen) == 200
        plan = orjson.loads((out / "blocks" / "plan.json").read_bytes())
        assert plan["block_size"] == 50 and len(plan["blocks"]) == 4
        # a re-run finds every block done: nothing is sent, nothing rewritten
        code, err = fair(*_args(srv, inp, out, "--ray", cluster))
        assert code == 0 and "4 of 4 blocks already done" in err, err
        assert len(srv.seen) == 200
        # the input changed under the run directory: exit 2 naming the block
        lines = inp.read_bytes().splitlines(keepends=True)
        lines[120] = b'{"id": "other", "prompt": "x"}\n'
        inp.write_bytes(b"".join(lines))
        code, err = fair(*_args(srv, inp, out, "--ray", cluster))
    assert code == 2 and "changed" in err and "b00002" in err, err


def test_worker_killed_mid_block_redone_under_new_epoch(cluster: str, tmp_path: Path) -> None:
    inp = write_input(tmp_path / "in.jsonl", 300)
    out = tmp_path / "out"
    killed: list[str] = []

    def watch() -> bool:
        if not killed:
            for pid_file in (out / "blocks" / "pids").glob("b00001.e1"):
                if block_lines(out, "b00001") >= 20 and kill_pid_file(pid_file):
                    killed.append(pid_file.name)
        return False

    with FakeServerThread(latency_s=0.05) as srv:
        code, err = fair(*_args(srv, inp, out, "--ray", cluster, "--block-size", "100", "--concurrency", "8"),
                         watch=watch)  # fmt: skip
        seen = len(srv.seen)
    assert killed and code == 0, err
    assert texts(out) == expected(300)  # no record lost, none twice (records() checks)
    assert (out / "blocks" / "b00001.e2.json").exists()
    adopted = sum(1 for p in (out / "responses").glob("shard-b00001.e1-*"))
    assert adopted >= 1  # the dead attempt's complete records stay and count
    assert seen - 300 <= 8, f"{seen - 300} calls paid twice; at most the 8 in flight may be"
    assert read_manifest(out)["ray"]["workers_lost"] == 1


def test_driver_killed_then_rerun_skips_done_blocks(cluster: str, tmp_path: Path) -> None:
    inp = write_input(tmp_path / "in.jsonl", 400)
    out = tmp_path / "out"

    def watch() -> bool:  # one block done, another part-way
        done = list((out / "blocks").glob("b*.e1.json"))
        return bool(done) and sum(block_lines(out, f"b0000{i}") for i in range(4)) >= 160

    with FakeServerThread(latency_s=0.05) as srv:
        code, _ = fair(*_args(srv, inp, out, "--ray", cluster, "--block-size", "100", "--concurrency", "8"),
                       watch=watch)  # fmt: skip
        assert code == -signal.SIGKILL
        done_first = {p.name.split(".")[0] for p in (out / "blocks").glob("b*.e1.json")}
        before = len(srv.seen)
        code, err = fair(*_args(srv, inp, out, "--ray", cluster))
        assert code == 0, err
        paid_again = len(srv.seen) - before
    assert texts(out) == expected(400)
    for block in done_first:  # done blocks were skipped: no second attempt
        assert not list((out / "blocks").glob(f"{block}.e2*")), block
    assert before + paid_again - 400 <= 16  # only calls in flight at the kill are paid again


def test_limiter_killed_run_finishes(cluster: str, tmp_path: Path) -> None:
    inp = write_input(tmp_path / "in.jsonl", 300)
    out = tmp_path / "out"
    killed: list[bool] = []

    def watch() -> bool:
        if not killed and block_lines(out, "b00000") + block_lines(out, "b00001") >= 40:
            killed.append(kill_pid_file(out / "blocks" / "pids" / "limiter"))
        return False

    with FakeServerThread(latency_s=0.02, rpm=6000) as srv:
        code, err = fair(*_args(srv, inp, out, "--ray", cluster, "--block-size", "100", "--concurrency", "8"),
                         watch=watch)  # fmt: skip
    assert killed == [True] and code == 0, err
    assert texts(out) == expected(300)


def test_auth_refused_in_a_block_aborts_everything(cluster: str, tmp_path: Path) -> None:
    inp = write_input(tmp_path / "in.jsonl", 200)
    out = tmp_path / "out"
    with FakeServerThread() as srv:
        srv.rule = lambda _: "status:401" if len(srv.seen) > 30 else None
        code, err = fair(*_args(srv, inp, out, "--ray", cluster, "--block-size", "50"))
    assert code == 3 and "aborted" in err and "401" in err, err
    assert read_manifest(out)["status"] == "aborted"
    assert len(records(out)) < 200


def test_block_that_kills_three_workers_exits_1_naming_it(cluster: str, tmp_path: Path) -> None:
    inp = write_input(tmp_path / "in.jsonl", 200)
    out = tmp_path / "out"
    killed: set[str] = set()

    def watch() -> bool:
        for pid_file in (out / "blocks" / "pids").glob("b00001.e*"):
            if pid_file.name not in killed and kill_pid_file(pid_file):
                killed.add(pid_file.name)
        return False

    with FakeServerThread(latency_s=0.05) as srv:
        code, err = fair(*_args(srv, inp, out, "--ray", cluster, "--block-size", "50"), watch=watch)
    assert code == 1 and "block b00001" in err and "3 attempts in a row" in err, err
    assert len(killed) == 3


def test_worker_without_the_key_exits_2_naming_variable_and_node(cluster: str, tmp_path: Path) -> None:
    """The cluster was started without FAIR_SCALE_KEY; the driver has it: workers read their own
    environment, so the run stops with exit 2 naming the variable and the node (and no key)."""
    inp = write_input(tmp_path / "in.jsonl", 20)
    out = tmp_path / "out"
    secret = "sk-scale-test-0123456789abcdef"
    with FakeServerThread() as srv:
        code, err = fair(*_args(srv, inp, out, "--ray", cluster, "--api-key-env", "FAIR_SCALE_KEY"),
                         env={"FAIR_SCALE_KEY": secret})  # fmt: skip
    assert code == 2 and "FAIR_SCALE_KEY" in err and "127.0.0.1" in err, err
    assert secret not in err
    for path in out.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_fair_run_on_ray_same_records_as_single_process(cluster: str, tmp_path: Path) -> None:
    """`fair run CONFIG --ray`: blocks of problems through `pipeline.Job` in the workers; every
    record kind equals the single-process run's; only the driver writes config.toml / report.md."""
    from test_pipeline import _write_job, problems, profile

    from fairdistill.engine.sim import SimThread

    probs = problems(20)
    with SimThread(profile(), probs) as sim:
        job = _write_job(tmp_path, sim.base_url, probs)
        code1, err1 = fair("run", str(job), "--run-dir", str(tmp_path / "single"), "--no-progress")
        code2, err2 = fair("run", str(job), "--run-dir", str(tmp_path / "ray"),
                           "--ray", cluster, "--block-size", "5")  # fmt: skip
    assert (code1, code2) == (0, 0), (err1, err2)
    # the shared progress display, fed per finished block (not a terminal: a last plain line)
    last = [line for line in err2.splitlines() if line.startswith("problems ")][-1]
    assert last.startswith("problems 20/20 |") and "calls " in last, err2
    for kind in ("attempts", "rationales", "feedback", "reviews", "samples", "failures", "problems"):
        single, ray = (
            sorted((_drop(r, "calls") for r in iter_raw(tmp_path / arm, kind)), key=lambda r: r["id"])
            for arm in ("single", "ray")
        )
        assert single == ray, kind
    ray_dir = tmp_path / "ray"
    manifest = read_manifest(ray_dir)
    assert manifest["status"] == "done" and manifest["problems_total"] == 20
    assert manifest["ray"]["blocks"] == 4
    assert (ray_dir / "config.toml").exists() and (ray_dir / "report.md").exists()
    assert sorted(p.name for p in (ray_dir / "blocks").glob("*.json")) == [
        "b00000.e1.json", "b00001.e1.json", "b00002.e1.json", "b00003.e1.json", "plan.json",
    ]  # fmt: skip


def _drop(record: dict, key: str) -> dict:
    record.pop(key, None)
    return record


def test_engine_does_not_import_ray_without_the_flag() -> None:
    code = (
        "import sys, engine.cli, engine.generate, engine.fair.pipeline, engine.scale, engine.scale.plan; "
        "sys.exit('ray' in sys.modules)"
    )
    assert subprocess.run([PY, "-c", code], cwd=REPO).returncode == 0


def test_a_fenced_attempt_stops_before_its_next_write(tmp_path: Path) -> None:
    """A zombie (an attempt whose block was handed on) never writes beside its successor."""
    from fairdistill.engine.rundir.schema import Response
    from fairdistill.engine.rundir.store import atomic_write
    from fairdistill.engine.scale.worker import Fenced, FencedStore, fence_path

    fence = fence_path(tmp_path, "b00003")
    fence.parent.mkdir(parents=True)
    atomic_write(fence, b"1\n")
    old = FencedStore(tmp_path, "b00003", 1).open(["responses"])
    assert old.write("responses", Response(id="a", texts=["x"]))
    atomic_write(fence, b"2\n")  # the driver hands the block to epoch 2
    new = FencedStore(tmp_path, "b00003", 2).open(["responses"])
    assert new.has("responses", "a")  # the complete record is adopted
    with pytest.raises(Fenced):
        old.write("responses", Response(id="b", texts=["y"]))
    assert new.write("responses", Response(id="b", texts=["y"]))
    fence_path(tmp_path, "b00004").write_text("1\n")
    other = FencedStore(tmp_path, "b00004", 1).open(["responses"])
    assert not other.has("responses", "a")  # a block sees only its own records


def test_breaker_in_a_block_aborts_the_run_exit_3(cluster: str, tmp_path: Path) -> None:
    """The student is unreachable: a block's breaker trips, the driver stops everything."""
    from test_pipeline import CONFIG_TOML, TEACHERS

    data = tmp_path / "problems.jsonl"
    rows = [{"id": f"p{i}", "question": f"{i} + 1?", "answer": str(i + 1)} for i in range(30)]
    data.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    eps = "".join(
        f'[endpoints.{n}]\nbase_url = "http://127.0.0.1:9/v1"\nmodel = "{n}"\nmax_attempts = 1\n'
        for n in [*TEACHERS, "student"]
    )
    job = tmp_path / "job.toml"
    job.write_text(
        CONFIG_TOML.format(data=data, endpoints=eps).replace("seed = 3", "seed = 3\nbreaker_window = 10")
    )
    code, err = fair("run", str(job), "--run-dir", str(tmp_path / "out"), "--no-progress", "--ray", cluster,
                     "--block-size", "15")  # fmt: skip
    assert code == 3 and "aborted" in err and "problems failed" in err, err
    assert read_manifest(tmp_path / "out")["status"] == "aborted"


def test_lent_slots_never_exceed_the_global_concurrency(cluster: str, tmp_path: Path) -> None:
    """An endpoint with only a concurrency cap lends its leases: calls reuse them without a
    limiter round trip, yet two workers (each running 2 blocks of 16 tasks) never have more than
    the global 16 in flight at the server."""
    inp = write_input(tmp_path / "in.jsonl", 800)
    out = tmp_path / "out"
    with FakeServerThread(latency_s=0.03) as srv:
        code, err = fair(*_args(srv, inp, out, "--ray", cluster, "--workers", "2", "--block-size", "100",
                                "--concurrency", "16", "--no-cache"))  # fmt: skip
        peak = srv.peak_in_flight
    assert code == 0, err
    assert texts(out) == expected(800)
    assert 8 <= peak <= 16, f"peak in flight {peak}, global concurrency 16"
    limiter = read_manifest(out)["ray"]["limiter"]
    assert limiter["reused"] > 200, limiter  # most calls ran on a lent lease
    assert limiter["round_trips"] < 400, limiter


def test_lending_stops_when_the_server_rate_limits(cluster: str, tmp_path: Path) -> None:
    """A hidden limit (no headers) answers 429s: lending closes for good (AIMD gates the endpoint)
    and the workers ask the limiter for every call again, instead of reusing leases at full
    speed: only the calls of the server's first second (its burst of 50) may run on a lent lease."""
    inp = write_input(tmp_path / "in.jsonl", 300)
    out = tmp_path / "out"
    with FakeServerThread(latency_s=0.02, rpm=3000, burst_s=1, rate_headers=False) as srv:
        code, err = fair(*_args(srv, inp, out, "--ray", cluster, "--workers", "2", "--block-size", "50",
                                "--concurrency", "64", "--no-cache"))  # fmt: skip
        refused = srv.count(429)
    assert code == 0, err
    assert texts(out) == expected(300)
    limiter = read_manifest(out)["ray"]["limiter"]
    assert limiter["reused"] <= 100, limiter
    assert limiter["granted"] >= 200, limiter  # the rest went through the limiter one by one
    assert refused < 150, f"{refused} 429s for 300 calls"


def test_prior_records_of_a_block_read_only_its_own_shards(tmp_path: Path) -> None:
    """A block's resume indexes the shards of its own attempts, not every block's."""
    from fairdistill.engine.fair.resume import PriorRecords
    from fairdistill.engine.rundir.schema import Attempt
    from fairdistill.engine.rundir.store import RunStore

    for block, pids in (("b00000", ("p1", "p2")), ("b00001", ("p3",))):
        store = RunStore(tmp_path, writer=f"{block}.e1", scope=f"{block}.").open(["attempts"])
        for pid in pids:
            store.write("attempts", Attempt(
                id=f"{pid}/attempt/s/0", problem_id=pid, student="s", sample_index=0, text=f"{pid} try",
                answer=None, correct=False, prompt_version="v1",
            ))  # fmt: skip
        store.close("interrupted")
    everything = PriorRecords(tmp_path, ["attempts"], done=set())
    assert len(everything) == 3
    mine = PriorRecords(tmp_path, ["attempts"], done=set(), scope="b00000.")
    assert len(mine) == 2 and mine.load("p3") == 0 and mine.load("p1") == 1
    assert len(PriorRecords(tmp_path, ["attempts"], done=set(), scope="b00001.")) == 1


def test_problem_blocks_stream_the_dataset_in_block_order() -> None:
    """The driver reads a block's problems when it is handed out, keeps them until it is done,
    skips blocks done earlier, and stops (exit 2) when the stream no longer matches the plan."""
    from fairdistill.engine.errors import ConfigError
    from fairdistill.engine.rundir.schema import Problem
    from fairdistill.engine.scale.plan import ProblemBlocks, run_plan

    def problems(n: int, rename: int = -1) -> Iterator[Problem]:
        for i in range(n):
            pid = f"x{i}" if i == rename else f"p{i}"
            yield Problem(id=pid, question=f"q{i}", answer=str(i), task="numeric")

    plan = run_plan((f"p{i}" for i in range(23)), "test", 10)
    assert [b.count for b in plan.blocks] == [10, 10, 3]
    read: list[int] = []

    def counted() -> Iterator[Problem]:
        for p in problems(23):
            read.append(1)
            yield p

    feed = ProblemBlocks(counted(), plan, {"b00001", "b00002"})  # b00000 was done before
    b1 = feed.get(plan.blocks[1])
    assert [p.id for p in b1] == [f"p{i}" for i in range(10, 20)] and len(read) == 20 and len(feed) == 1
    assert feed.get(plan.blocks[1]) is b1  # handed out again (its worker died): still held
    feed.drop("b00001")
    assert [p.id for p in feed.get(plan.blocks[2])] == ["p20", "p21", "p22"] and len(feed) == 1
    with pytest.raises(ConfigError, match="b00001"):
        feed.get(plan.blocks[1])  # dropped: never read twice
    with pytest.raises(ConfigError, match="changed"):
        ProblemBlocks(problems(23, rename=4), plan, {"b00000"}).get(plan.blocks[0])


def test_generate_on_ray_shows_the_shared_progress(cluster: str, tmp_path: Path) -> None:
    """Without --no-progress the driver shows the single-process progress display, advanced by
    finished blocks with their request counters; a re-run counts the done records as resumed."""
    inp = write_input(tmp_path / "in.jsonl", 200)
    out = tmp_path / "out"
    with FakeServerThread() as srv:
        args = _args(srv, inp, out, "--ray", cluster, "--block-size", "50")
        args.remove("--no-progress")
        code, err = fair(*args)
        assert code == 0, err
        last = [line for line in err.splitlines() if line.startswith("responses ")][-1]
        assert last.startswith("responses 200/200 |") and "calls " in last and "/s" in last, err
        code, err = fair(*args)
    assert code == 0, err
    assert [line for line in err.splitlines() if line.startswith("responses ")][-1].startswith(
        "responses 200/200 | 0.0/s"
    ), err


# -- the limiter's protocol, without a cluster (LimiterState is the actor's plain class) ----------


def test_limiter_buckets_start_empty_however_long_they_waited() -> None:
    """Configured buckets are empty at the first request even when the limiter was built long
    before it: the refill since then must not go at once (the first 10 s window at 3,000 rpm
    carried 1.10x the limit when only the level at the last refill was emptied)."""
    from fairdistill.engine.request.admission import Admission
    from fairdistill.engine.scale.limiter import start_empty

    idle, emptied = Admission(64, 600, None), Admission(64, 600, None)  # 10 requests a second
    for admission in (idle, emptied):
        admission.requests.updated -= 30  # built 30 s before the first request
    start_empty(emptied)
    now = time.monotonic()
    assert idle.requests.reserve(1.0, now) == 0.0  # a full bucket: a second's worth at once
    assert emptied.requests.reserve(1.0, now) > 0.05  # the first request waits for its refill


def test_a_request_dropped_before_its_acquire_arrives_takes_no_lease() -> None:
    """A proxy drops requests it served itself with a lent lease in its release message, which
    Ray may run before the acquire that queued them: the limiter remembers the drop, and the late
    request takes no lease (one granted to it would wait for a round trip that never comes)."""
    import asyncio

    from fairdistill.engine.scale.limiter import LimiterState

    async def scenario() -> None:
        lim = LimiterState({"ep": (2, None, None)})
        lim.release([], None, ("w1", "ep", [5]))  # the drop overtook its acquire
        granted, _, _ = await lim.acquire("w1", "ep", [(5, 0.0)])
        assert granted == [] and not lim.waiting[("w1", "ep")]
        granted, _, _ = await lim.acquire("w0", "ep", [(0, 0.0), (1, 0.0)])
        assert len(granted) == 2  # both leases were still free
        lim.release([], None, ("w0", "ep", [0]))  # a drop of a request already granted...
        assert not lim.early.get(("w0", "ep"))  # ...leaves nothing behind

    asyncio.run(scenario())


def test_the_end_of_lending_answers_every_held_round_trip(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 429 ends lending: every worker's held round trip is answered at once with ``lend_s`` 0,
    not when its hold runs out, so no worker goes on reusing leases meanwhile."""
    import asyncio

    from fairdistill.engine.scale import limiter

    monkeypatch.setattr(limiter, "HOLD_S", 60.0)

    async def scenario() -> None:
        lim = limiter.LimiterState({"ep": (1, None, None)})
        (grant,), _, lend = await lim.acquire("w0", "ep", [(0, 0.0)])
        assert lend == 0.0  # cold: not lent
        lim.release([(grant[1], 200, None, None)])  # the first answer: only the cap in force
        (grant,), _, lend = await lim.acquire("w0", "ep", [(1, 0.0)])
        assert lend > 0
        held = asyncio.ensure_future(lim.acquire("w1", "ep", [(0, 0.0)]))  # the cap is 1: it waits
        await asyncio.sleep(0.05)
        assert not held.done()
        lim.release([(grant[1], 429, {"retry-after": "5"}, None)])
        granted, _, lend = await asyncio.wait_for(held, 10)
        assert granted == [] and lend == 0.0  # told at once; the pause keeps the lease back

    asyncio.run(scenario())


def test_fair_run_on_ray_budget_cap_holds_across_workers_then_resumes(cluster: str, tmp_path: Path) -> None:
    """`run.max_cost_usd` with --ray: one ledger for every worker. A cap at 30 % of the full
    bill stops the run (exit 3, manifest `budget`) near the cap; run again with a higher cap, it
    finishes with the records of an uncapped run and nothing paid twice."""
    from test_pipeline import CONFIG_TOML, TEACHERS, problems, profile

    from fairdistill.engine.sim import SimThread

    probs = problems(48)
    data = tmp_path / "problems.jsonl"
    rows = ({"id": p.id, "question": p.question, "answer": p.answer} for p in probs)
    data.write_bytes(b"".join(orjson.dumps(row) + b"\n" for row in rows))
    kinds = ("attempts", "rationales", "feedback", "reviews", "samples", "failures", "problems")

    def job(base_url: str, name: str, cap: float | None = None) -> str:
        eps = "".join(
            f'[endpoints.{n}]\nbase_url = "{base_url}"\nmodel = "{n}"\nprice_in = 1.0\nprice_out = 2.0\n'
            for n in [*TEACHERS, "student"]
        )
        run = "max_in_flight = 2" + (f"\nmax_cost_usd = {cap}" if cap is not None else "")
        path = tmp_path / f"{name}.toml"
        path.write_text(CONFIG_TOML.format(data=data, endpoints=eps).replace("max_in_flight = 8", run))
        return str(path)

    def run(config: str, out: Path) -> tuple[int, str]:
        return fair("run", config, "--run-dir", str(out), "--no-progress", "--ray", cluster,
                    "--workers", "2", "--block-size", "8")  # fmt: skip

    def records(out: Path) -> dict[str, list]:
        return {k: sorted((_drop(r, "calls") for r in iter_raw(out, k)), key=lambda r: r["id"])
                for k in kinds}  # fmt: skip

    with SimThread(profile(), probs) as sim:
        code, err = run(job(sim.base_url, "full"), tmp_path / "full")
        assert code == 0, err
        full = read_manifest(tmp_path / "full")["budget"]["spent_usd"]
        paid_full = sim.stats["requests"]
        sim.stats.reset()

        out = tmp_path / "capped"
        code, err = run(job(sim.base_url, "capped", 0.3 * full), out)
        assert code == 3 and "run.max_cost_usd" in err and "reached" in err, err
        manifest = read_manifest(out)
        assert manifest["status"] == "budget" and manifest["counts"]["problems"] < len(probs)
        spent = manifest["budget"]["spent_usd"]
        window = 8 * 2 * full / len(probs)  # 2 workers x 2 blocks x 2 problems in flight, ~2x the mean
        assert 0.3 * full - window <= spent <= 0.3 * full + window, (spent, full)

        code, err = run(job(sim.base_url, "raised", 10 * full), out)
        assert code == 0, err
        paid = sim.stats["requests"]
    assert records(out) == records(tmp_path / "full")
    assert paid_full - 5 <= paid <= paid_full  # nothing paid twice (a block's cache may even save some)
    assert 0.98 * full <= read_manifest(out)["budget"]["spent_usd"] <= full * (1 + 1e-6)


def test_the_ledger_admits_problems_of_every_worker_under_one_cap() -> None:
    """The single-process rule over all block attempts: at most PROBE problems until one has
    finished, then spent + committed + one more problem within the cap; the stop is for all."""
    from fairdistill.engine.fair.budget import PROBE
    from fairdistill.engine.scale.budget import Ledger

    ledger = Ledger(1.0, None)
    verdicts = [ledger.reserve(w, 0.0, 0)[0] for w in ("a", "b") * PROBE]
    assert verdicts == ["go"] * PROBE + ["wait"] * PROBE  # the probe is global, not per worker
    assert ledger.reserve("a", 0.2, 2) == ("go", 0.2)  # 2 done at 0.1: room for more
    verdict, total = ledger.reserve("b", 0.7, 1)  # b's problems turned out dear
    assert verdict == "stop" and total == pytest.approx(0.9)  # 0.9 spent + committed in flight > the cap
    assert ledger.reserve("a", 0.2, 3)[0] == "stop"  # and a stops too, though it spent little


# -- --metrics-port with --ray (engine.scale.metrics) --------------------------------------------


def _hold_answer(srv: FakeServer, needle: bytes) -> tuple[threading.Event, list[int]]:
    """The server holds back its answer to the request whose body has ``needle`` until the
    returned event is set; the list gets an item when that request has come."""
    gate, came = threading.Event(), []
    respond = srv._respond

    async def maybe_hold(request, answer):  # type: ignore[no-untyped-def]
        if needle in await request.read() and not gate.is_set():
            came.append(1)
            while not gate.is_set():
                await asyncio.sleep(0.01)
        return await respond(request, answer)

    srv._respond = maybe_hold  # type: ignore[method-assign]
    return gate, came


def _scraped_run(tmp_path: Path, name: str, n: int, *extra: str) -> tuple[int, str, list[dict], Path]:
    """`fair generate` scraped twice: a quarter of the way, and with every answer in but the
    last line's (held by the server, so the run is still going)."""
    from test_metrics import scrape

    inp = write_input(tmp_path / "in.jsonl", n)
    out = tmp_path / name
    port = _free_port(19400, 19500)
    scrapes: list[dict] = []
    with FakeServerThread(latency_s=0.05) as srv:
        gate, came = _hold_answer(srv, f'question {n - 1}"'.encode())

        def watch() -> bool:
            written = sum(p.read_bytes().count(b"\n") for p in out.glob("responses/shard-*"))
            if not scrapes and written >= n // 4:
                scrapes.append(scrape(port))
            elif len(scrapes) == 1 and written == n - 1 and came:
                scrapes.append(scrape(port))
                gate.set()
            return False

        code, err = fair(*_args(srv, inp, out, "--rpm", "60000", "--concurrency", "4", "--metrics-port",
                                str(port), *extra), watch=watch)  # fmt: skip
        gate.set()
    return code, err, scrapes, out


def test_metrics_port_on_ray_serves_the_cluster_like_one_process(cluster: str, tmp_path: Path) -> None:
    """`--metrics-port` with `--ray`: the driver serves the cluster's /metrics: the names and
    labels of a single-process run, the counters summed over the workers (equal to the records
    written), the in-flight gauge live, the admission rate the limiter's; never going back."""
    from test_metrics import one

    n = 200
    code, err, (first, single), _ = _scraped_run(tmp_path, "single", n)
    assert code == 0, err
    code, err, (early, held), out = _scraped_run(
        tmp_path, "ray", n, "--ray", cluster, "--workers", "2", "--block-size", "50"
    )
    assert code == 0, err
    assert texts(out) == expected(n)
    for scraped in (single, held):  # every answer but the held one is in, and counted once
        assert one(scraped, "fair_requests_total", endpoint="default", outcome="ok") == n - 1
        assert one(scraped, "fair_requests_total", endpoint="default", outcome="cached") == 0
        assert one(scraped, "fair_http_calls_total", endpoint="default") == n
        assert one(scraped, "fair_in_flight", endpoint="default") == 1
        assert one(scraped, "fair_request_latency_seconds_count", endpoint="default") == n - 1
        assert one(scraped, "fair_effective_rpm", endpoint="default") > 0
        assert one(scraped, "fair_admission_rpm", endpoint="default") == pytest.approx(60000)
    assert held["fair_tokens_total"] == single["fair_tokens_total"]  # the same answers, summed
    ours = {name: set(samples) for name, samples in held.items() if not name.startswith("fair_ray_")}
    assert ours == {name: set(samples) for name, samples in single.items()}  # same names and labels
    assert one(held, "fair_ray_workers") == 2 and one(held, "fair_ray_stale_workers") == 0
    assert 0 < one(early, "fair_requests_total", endpoint="default", outcome="ok") < n - 1
    for name, samples in early.items():  # counters never go backwards
        if name.endswith(("_total", "_count", "_bucket", "_sum")):
            for labels, value in samples.items():
                assert held[name][labels] >= value, (name, labels)
    assert first  # the single-process run was scraped mid-run too


def test_metrics_port_on_ray_busy_port_exit_2_before_ray_starts(tmp_path: Path, capsys) -> None:
    inp = write_input(tmp_path / "in.jsonl", 3)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = main(["generate", "--endpoint", "http://127.0.0.1:9/v1", "--model", "m", "--input", str(inp),
                     "--output", str(tmp_path / "out"), "--no-progress", "--ray", "--metrics-port",
                     str(port)])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and f"--metrics-port {port}" in err and "Traceback" not in err, err
    assert not (tmp_path / "out" / "blocks" / "pids").exists()  # refused before Ray was started


def test_fair_run_on_ray_metrics_port_exports_stages_of_every_worker(cluster: str, tmp_path: Path) -> None:
    """`fair run --ray --metrics-port`: the stage counters and every endpoint's requests, summed
    over the workers' blocks, scraped mid-run; they stay within what the run finally paid."""
    from test_metrics import one, scrape
    from test_pipeline import _write_job, problems, profile

    from fairdistill.engine.sim import SimThread

    probs = problems(24)
    out = tmp_path / "ray"
    port = _free_port(19400, 19500)
    mid: list[dict] = []
    written: list[int] = []

    def watch() -> bool:
        done = sum(p.read_bytes().count(b"\n") for p in out.glob("problems/shard-*"))
        if not mid and done >= 4:
            written.append(done)
            mid.append(scrape(port))
        return False

    with SimThread(profile(latency_ms=100), probs) as sim:
        job = _write_job(tmp_path, sim.base_url, probs)
        args = ["--ray", cluster, "--workers", "2", "--block-size", "6", "--metrics-port", str(port)]
        code, err = fair("run", str(job), "--run-dir", str(out), "--no-progress", *args, watch=watch)
        paid = sim.stats["requests"]
    assert code == 0, err
    assert mid, "never scraped mid-run"
    scraped = mid[0]
    done = one(scraped, "fair_stage_total", stage="problems", outcome="done")
    assert written[0] <= done < len(probs)
    assert one(scraped, "fair_stage_total", stage="student", outcome="attempts") >= done
    endpoints = read_manifest(out)["endpoints"]
    assert {dict(k)["endpoint"] for k in scraped["fair_http_calls_total"]} == set(endpoints)
    calls = sum(scraped["fair_http_calls_total"].values())
    assert 0 < calls <= sum(e["calls"] for e in endpoints.values()) == paid


# -- --estimate with --ray (engine.scale.estimate) -----------------------------------------------


def test_estimate_on_ray_then_the_full_run_pays_the_pilot_once(cluster: str, tmp_path: Path) -> None:
    """`fair run --estimate --ray`: the first 8 problems as block attempts (b00000 whole, the
    first 3 of b00001 as a `pilot` attempt), the projection printed and written; then the full
    `--ray` run skips b00000, redoes b00001 adopting the pilot's records, and the server is paid
    once for everything (pilot + rest = an uninterrupted run), with the same records."""
    from test_pipeline import _write_job, problems, profile

    from fairdistill.engine.sim import SimThread

    probs = problems(20)
    kinds = ("attempts", "rationales", "feedback", "reviews", "samples", "failures", "problems")

    def run(job: Path, out: Path, *extra: str, ray: bool = True) -> subprocess.CompletedProcess:
        scale = ["--ray", cluster, "--workers", "2", "--block-size", "5"] if ray else []
        return subprocess.run(
            [PY, "-m", "fairdistill", "run", str(job), "--run-dir", str(out), "--no-progress",
             *scale, *extra],
            cwd=REPO, capture_output=True, text=True, env={**os.environ, **LOOPBACK}, timeout=240,
        )  # fmt: skip

    def records(out: Path) -> dict[str, list]:
        return {k: sorted((_drop(r, "calls") for r in iter_raw(out, k)), key=lambda r: r["id"])
                for k in kinds}  # fmt: skip

    with SimThread(profile(), probs) as sim:
        job = _write_job(tmp_path, sim.base_url, probs)
        plain = run(job, tmp_path / "plain")
        assert plain.returncode == 0, plain.stderr
        paid_plain = sim.stats["requests"]
        sim.stats.reset()
        out = tmp_path / "est"
        est = run(job, out, "--estimate", "--pilot", "8")
        assert est.returncode == 0, est.stderr
        paid_pilot = sim.stats["requests"]
        sim.stats.reset()
        full = run(job, out)
        assert full.returncode == 0, full.stderr
        paid_rest = sim.stats["requests"]
        alone = run(job, tmp_path / "alone", "--estimate", "--pilot", "8", ray=False)
        assert alone.returncode == 0, alone.stderr
    assert "estimate for 20 problems from a pilot of 8" in est.stdout, est.stdout
    estimate = orjson.loads((out / "estimate.json").read_bytes())
    assert estimate["pilot"] == 8 and estimate["problems"] == 20
    single = orjson.loads((tmp_path / "alone" / "estimate.json").read_bytes())
    for key in ("endpoints", "stages", "usd_online", "usd_batch", "acceptance_rate"):
        assert estimate[key] == single[key], key  # the single-process projection of the same pilot
    assert est.stdout.splitlines()[:-1] == alone.stdout.splitlines()[:-1]  # (the last has wall time)
    assert orjson.loads((out / "blocks" / "b00001.e1.json").read_bytes())["status"] == "pilot"
    assert not list((out / "blocks").glob("b00000.e2*"))  # the whole pilot block was skipped
    assert (out / "blocks" / "b00001.e2.json").exists()  # the part-piloted one redone, adopting
    assert 0 < paid_pilot < paid_plain
    assert paid_pilot + paid_rest <= paid_plain  # nothing paid twice
    assert records(out) == records(tmp_path / "plain")
    assert read_manifest(out)["status"] == "done"


def test_more_workers_than_the_cluster_can_place_exit_2_at_once(cluster: str, tmp_path: Path) -> None:
    """8 workers of 0.5 CPU on a 2-CPU cluster would wait forever: refused, naming the numbers."""
    inp = write_input(tmp_path / "in.jsonl", 20)
    with FakeServerThread() as srv:
        t0 = time.monotonic()
        code, err = fair(*_args(srv, inp, tmp_path / "out", "--ray", cluster, "--workers", "8"), timeout=120)
        assert len(srv.seen) == 0
    assert code == 2 and "--workers 8" in err and "room for 4 workers" in err, err
    assert time.monotonic() - t0 < 60 and "Traceback" not in err


def test_emptied_shard_of_a_done_block_is_refused_then_redone(cluster: str, tmp_path: Path) -> None:
    """A done block's shard emptied afterwards: the rerun refuses (exit 2 naming the shard), not
    skips; `fair repair` marks the block to be redone; the rerun makes its records again from the
    block's cache (nothing paid twice) and no other block runs again."""
    inp = write_input(tmp_path / "in.jsonl", 100)
    out = tmp_path / "out"
    with FakeServerThread() as srv:
        code, err = fair(*_args(srv, inp, out, "--ray", cluster, "--block-size", "50"))
        assert code == 0, err
        shard = next((out / "responses").glob("shard-b00001.e1-*.jsonl"))
        shard.write_bytes(b"")
        code, err = fair(*_args(srv, inp, out, "--ray", cluster))
        assert code == 2 and str(shard) in err and "changed since" in err and "fair repair" in err, err
        code, err = fair("repair", str(out))
        assert code == 0 and "blocks/b00001.e1.json" in err and "redone" in err, err
        code, err = fair(*_args(srv, inp, out, "--ray", cluster))
        assert code == 0 and "1 of 2 blocks already done" in err, err
        assert len(srv.seen) == 100  # the redone block's calls came from its cache
    assert texts(out) == expected(100)
    assert list((out / "blocks").glob("b00001.e2.json")) and not list((out / "blocks").glob("b00000.e2*"))


def test_torn_shard_of_a_ray_run_same_line_from_status_and_resume(cluster: str, tmp_path: Path) -> None:
    inp = write_input(tmp_path / "in.jsonl", 60)
    out = tmp_path / "out"
    with FakeServerThread() as srv:
        code, err = fair(*_args(srv, inp, out, "--ray", cluster, "--block-size", "30"))
        assert code == 0, err
        shard = next((out / "responses").glob("shard-b00000.e1-*.jsonl"))
        shard.write_bytes(shard.read_bytes()[:-7])  # a full disk: the last line lost its end
        lines = shard.read_bytes().count(b"\n") + 1
        where = f"{shard}:{lines}"
        code, err = fair(*_args(srv, inp, out, "--ray", cluster))
        assert code == 2 and where in err and "torn line" in err and len(srv.seen) == 60, err
    code, status_err = fair("status", str(out))
    assert code == 2 and where in status_err and "Traceback" not in status_err, status_err
