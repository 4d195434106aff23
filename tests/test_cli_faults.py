"""Never a traceback, never a hang; say what you do (issue 20), through the real ``fair`` command.

Each test runs ``python -m fairdistill`` as a child process against a real server on loopback
(``tests/fakeserver.py``, the simulator, the student server) or on files it damaged itself:

- a damaged user-editable JSON file (``dataset_info.json``, ``fair_training.json``,
  ``adapter_config.json``) is one line naming the file, exit 2, and nothing is written;
- ``fair train/eval/serve-student`` without the ``train`` extra say which extra to install (the
  child hides torch with a meta-path finder: the code under test is not touched);
- a ``Retry-After`` that is no valid delay is ignored (the run does not wait 600 s); a valid
  huge one is clamped to ``--max-wait``, and honoured;
- a flag that does not apply is refused (exit 2);
- ``--metrics-port 0`` (and ``serve-student --port 0``) print the port picked, which serves.
"""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import orjson
import pytest

from fairdistill.engine.rundir.schema import Msg, Sample
from fairdistill.engine.rundir.store import RunStore
from fairdistill.engine.services import Services, free_port
from tests.fakeserver import FakeServerThread, Seen, raw, records, write_input

ROOT = Path(__file__).resolve().parents[1]


def fair(*args: str, timeout: float = 120, env: dict | None = None, code: str | None = None):
    """``fair ARGS`` in a child (``python -m fairdistill``, or ``python -c CODE`` taking the args)."""
    head = ["-c", code] if code else ["-m", "fairdistill"]
    return subprocess.run(
        [sys.executable, *head, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


def one_line(proc: subprocess.CompletedProcess, rc: int, *needles: str) -> str:
    """Exit ``rc``, no traceback, and the last stderr line names every needle."""
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == rc, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    for needle in needles:
        assert needle in last, (needle, proc.stderr)
    return last


# -- damaged user-editable JSON files -------------------------------------------------------------

JUNK = {
    "not-json": b'{"fair_all": {',
    "array": b"[1, 2]",
    "empty": b"",
    "not-utf8": b'{"a": "\xff\xfe"}',
    "deep": b"[" * 100_000 + b"]" * 100_000,
}


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    store = RunStore(tmp_path / "run").open(["samples"])
    for i in range(2):
        msgs = [Msg("system", "s"), Msg("user", f"what is 2 + {i}?")]
        sample = Sample(id=f"p{i}/s/rationale/t", problem_id=f"p{i}", task="rationale", messages=msgs,
                        response=f"it is {2 + i}", teacher="t")  # fmt: skip
        store.write("samples", sample)
    store.close("done")
    return tmp_path / "run"


@pytest.mark.parametrize("junk", JUNK)
def test_export_llamafactory_with_a_damaged_dataset_info(run_dir: Path, tmp_path: Path, junk: str):
    out = tmp_path / "lf"
    out.mkdir()
    (out / "dataset_info.json").write_bytes(JUNK[junk])
    proc = fair("export", str(run_dir), "--format", "llamafactory", "--out", str(out))
    one_line(proc, 2, str(out / "dataset_info.json"))
    assert sorted(p.name for p in out.iterdir()) == ["dataset_info.json"], "nothing written before it"
    assert (out / "dataset_info.json").read_bytes() == JUNK[junk], "the user's file is left alone"


def test_export_llamafactory_keeps_a_good_dataset_info(run_dir: Path, tmp_path: Path):
    out = tmp_path / "lf"
    out.mkdir()
    (out / "dataset_info.json").write_text('{"mine": {"file_name": "mine.json"}}')
    assert fair("export", str(run_dir), "--format", "llamafactory", "--out", str(out)).returncode == 0
    info = orjson.loads((out / "dataset_info.json").read_bytes())
    assert "mine" in info and "fair_all" in info


def _adapter(
    folder: Path, record: bytes | None = None, config: bytes = b'{"r": 8, "peft_type": "LORA"}'
) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_bytes(config)
    if record is not None:
        (folder / "fair_training.json").write_bytes(record)
    return folder


RECORDS = {**JUNK, "ids-not-a-list": b'{"problem_ids": 5}', "ids-not-strings": b'{"problem_ids": [1, 2]}'}


@pytest.mark.parametrize("junk", RECORDS)
def test_eval_with_a_damaged_training_record(tmp_path: Path, junk: str):
    ad = _adapter(tmp_path / "ad", RECORDS[junk])
    proc = fair("eval", "--adapter", f"a={ad}", "--no-base", "--datasets", "builtin", "--limit", "2",
                "--out", str(tmp_path / "e"))  # fmt: skip
    one_line(proc, 2, str(ad / "fair_training.json"))
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("cmd", ["eval", "serve-student"])
def test_a_damaged_adapter_config_is_named_before_loading(tmp_path: Path, cmd: str):
    ad = _adapter(tmp_path / "ad", config=b'{"r": 8,')
    extra = ["--port", "0"] if cmd == "serve-student" else ["--no-base", "--out", str(tmp_path / "e")]
    t0 = time.monotonic()
    one_line(fair(cmd, "--adapter", f"a={ad}", *extra), 2, str(ad / "adapter_config.json"))
    assert time.monotonic() - t0 < 30, "named at once, not after loading a model"


def test_eval_names_the_adapter_before_looking_for_data(tmp_path: Path):
    """A fresh clone has no datasets: the bad adapter must still be what is reported."""
    (tmp_path / "ad").mkdir()
    (tmp_path / "no-data").mkdir()
    proc = fair("eval", "--adapter", f"x={tmp_path / 'ad'}", "--no-base", "--out", str(tmp_path / "e"),
                env={"FAIR_DATA_DIR": str(tmp_path / "no-data")})  # fmt: skip
    one_line(proc, 2, "adapter_config.json", str(tmp_path / "ad"))


# -- the `train` extra missing ----------------------------------------------------------------------

HIDE = """
import sys
class Hide:  # as if torch, transformers and peft were not installed
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {"torch", "transformers", "peft"}:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Hide())
from fairdistill.engine.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("cmd", ["train", "eval", "serve-student", "eval-transformers"])
def test_without_the_train_extra_say_which_to_install(tmp_path: Path, cmd: str):
    ad = _adapter(tmp_path / "ad")
    args = {
        "train": ["train", str(tmp_path / "run"), "--out", str(tmp_path / "t")],
        "eval": ["eval", "--datasets", "builtin", "--limit", "1", "--out", str(tmp_path / "e")],
        "serve-student": ["serve-student", "--port", "0", "--adapter", f"a={ad}"],
        "eval-transformers": [
            "eval",
            "--backend",
            "transformers",
            "--datasets",
            "builtin",
            "--limit",
            "1",
            "--adapter",
            f"a={ad}",
            "--out",
            str(tmp_path / "e"),
        ],
    }[cmd]
    proc = fair(*args, code=HIDE)
    one_line(proc, 2, "`train` extra", "pip install 'fairdistill[train]'")


def test_a_missing_module_of_our_own_is_still_a_bug(tmp_path: Path):
    """Only the extras' third-party modules are mapped: anything else stays exit 70."""
    code = HIDE.replace(
        '{"torch", "transformers", "peft"}', '{"fairdistill"} and name == "fairdistill.engine.fair.pipeline"'
    )
    proc = fair("run", str(tmp_path / "x.toml"), code=code, env={"XDG_CACHE_HOME": str(tmp_path)})
    assert proc.returncode == 70 and "internal error" in proc.stderr, proc.stderr


# -- server-given durations ------------------------------------------------------------------------

INVALID = {
    "inf": {"retry-after": "inf"},
    "nan": {"retry-after": "nan"},
    "negative": {"retry-after": "-5"},
    "exponent": {"retry-after": "1e308"},
    "garbage": {"retry-after": "soon"},
    "ms-inf": {"retry-after-ms": "inf"},
    "ms-negative": {"retry-after-ms": "-1"},
    "reset-inf": {
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "infs",
        "x-ratelimit-limit-requests": "nan",
    },
}


def _refuse_first(headers: dict[str, str]):
    """A rule: every line's first call is a 429 with ``headers``; the rest answer normally."""
    first: set[str] = set()

    def rule(seen: Seen) -> tuple | None:
        key = str(seen.body)
        if key in first:
            return None
        first.add(key)
        return raw(b'{"error": {"message": "slow down"}}', 429, headers)

    return rule


def _generate(srv, tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess, float]:
    inp = write_input(tmp_path / "in.jsonl", 4)
    t0 = time.monotonic()
    proc = fair("generate", "--endpoint", srv.url, "--model", "m", "--input", str(inp), "--output",
                str(tmp_path / "out"), "--no-progress", "--no-cache", *extra, timeout=90)  # fmt: skip
    return proc, time.monotonic() - t0


@pytest.mark.parametrize("name", INVALID)
def test_an_invalid_retry_after_is_ignored_not_waited_for(tmp_path: Path, name: str):
    """Default --max-wait (600 s): clamping `inf` to it would look like a hang."""
    with FakeServerThread(rule=_refuse_first(INVALID[name])) as srv:
        proc, elapsed = _generate(srv, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert all(r["error"] is None for r in records(tmp_path / "out").values())
    assert len(records(tmp_path / "out")) == 4
    assert elapsed < 30, f"waited {elapsed:.0f}s on an invalid Retry-After"


def test_a_valid_huge_retry_after_is_clamped_and_honoured(tmp_path: Path):
    refusals: list[int] = []

    def once(seen: Seen) -> tuple | None:  # one 429, then normal answers
        if refusals:
            return None
        refusals.append(1)
        return raw(b'{"error": {"message": "slow down"}}', 429, {"retry-after": "999999999"})

    with FakeServerThread(rule=once) as srv:
        proc, elapsed = _generate(srv, tmp_path, "--max-wait", "2", "--concurrency", "1")
        refused = [s for s in srv.seen if s.status == 429]
        later = [s for s in srv.seen if s.status == 200 and s.t > refused[0].t]
    assert proc.returncode == 0, proc.stderr
    assert len(records(tmp_path / "out")) == 4
    assert later and later[0].t - refused[0].t >= 1.8, "the clamped pause (2 s) was not honoured"
    assert elapsed < 40


# -- flags that do not apply -------------------------------------------------------------------------

GEN = ["generate", "--endpoint", "http://127.0.0.1:9/v1", "--model", "m", "--input", "i", "--output", "o"]
REFUSED = {
    "pilot-without-estimate": (["run", "job.toml", "--pilot", "5"], "--pilot", "--estimate"),
    "metrics-port-with-estimate": (
        ["run", "job.toml", "--estimate", "--metrics-port", "0"],
        "--metrics-port",
    ),
    "workers-without-ray": ([*GEN, "--workers", "3"], "--workers", "--ray"),
    "block-size-without-ray": (["run", "job.toml", "--block-size", "5"], "--block-size", "--ray"),
    "serve-cpu-max-lora-rank": (["serve-student", "--max-lora-rank", "8"], "--max-lora-rank", "vLLM"),
    "serve-cpu-gpu-memory": (
        ["serve-student", "--gpu-memory-utilization", "0.5"],
        "--gpu-memory-utilization",
    ),
    "eval-transformers-rank": (
        ["eval", "--backend", "transformers", "--max-lora-rank", "8"],
        "--max-lora-rank",
    ),
    "eval-no-base-no-adapter": (["eval", "--no-base"], "--no-base", "--adapter"),
    "train-full-lora-rank": (["train", "r", "--full", "--lora-rank", "4"], "--lora-rank", "--full"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_a_flag_that_does_not_apply_is_refused(tmp_path: Path, case: str):
    argv, *needles = REFUSED[case]
    proc = fair(*argv)
    line = one_line(proc, 2, *needles)
    assert len(proc.stderr.strip().splitlines()) == 1 and "ignored" in line


def test_pilot_with_estimate_passes_the_check(tmp_path: Path):
    proc = fair("run", str(tmp_path / "job.toml"), "--estimate", "--pilot", "3")
    one_line(proc, 2, "job.toml")  # the missing config is what is reported, not the flag
    assert "--pilot" not in proc.stderr


# -- port 0: say which ---------------------------------------------------------------------------------

URL = re.compile(r"(http://127\.0\.0\.1:(\d+)/\S*)")


class Child:
    """A ``fair`` child whose stderr lines are read as they come."""

    def __init__(self, *args: str, env: dict | None = None):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fairdistill", *args], cwd=ROOT, stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL, text=True, env={**os.environ, **(env or {})},
        )  # fmt: skip
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stderr:  # type: ignore[union-attr]
            self.lines.put(line)

    def wait_for(self, needle: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                continue
            self.seen.append(line)
            if needle in line:
                return line
        raise AssertionError(f"no {needle!r} within {timeout}s: {''.join(self.seen)}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(30)


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def test_generate_metrics_port_zero_says_which_port(tmp_path: Path):
    inp = write_input(tmp_path / "in.jsonl", 8)
    with FakeServerThread(latency_s=0.4) as srv:
        args = ["--input", str(inp), "--output", str(tmp_path / "out"), "--concurrency", "1"]
        child = Child("generate", "--endpoint", srv.url, "--model", "m", *args, "--metrics-port", "0")
        try:
            url, port = URL.search(child.wait_for("metrics on", 60)).groups()  # type: ignore[union-attr]
            assert int(port) > 0
            assert "fair_" in _scrape(url)
            assert child.proc.wait(60) == 0
        finally:
            child.stop()


SLOW_SIM = (
    'name = "slow"\ndefault_model = "m"\n[models.m]\ncontent = "reasoning"\nlatency_ms = 300\nskill = 0.5\n'
)


def test_run_metrics_port_zero_says_which_port(tmp_path: Path):
    profile, sim_port = tmp_path / "slow.toml", free_port()
    profile.write_text(SLOW_SIM)
    with Services(tmp_path / "logs") as services:
        argv = ["sim", "--profile", str(profile), "--dataset", "builtin", "--port", str(sim_port)]
        services.start("sim", argv, f"http://127.0.0.1:{sim_port}/health")
        base = f"http://127.0.0.1:{sim_port}/v1"
        ends = "".join(f'[endpoints.{e}]\nbase_url = "{base}"\nmodel = "m"\n' for e in ("s", "a", "b"))
        job = tmp_path / "job.toml"
        job.write_text('[dataset]\nname = "builtin"\nlimit = 3\n[student]\nendpoint = "s"\n'
                       f'[teachers]\nendpoints = ["a", "b"]\n{ends}')  # fmt: skip
        child = Child(
            "run", str(job), "--run-dir", str(tmp_path / "run"), "--no-progress", "--metrics-port", "0"
        )
        try:
            url, port = URL.search(child.wait_for("metrics on", 60)).groups()  # type: ignore[union-attr]
            assert int(port) > 0 and "fair_" in _scrape(url)
            assert child.proc.wait(120) in (0, 1)
        finally:
            child.stop()


def test_serve_student_port_zero_says_which_port(tmp_path: Path):
    from fairdistill.trainer.model import save_tiny_student

    tiny = save_tiny_student(tmp_path / "tiny")
    child = Child("serve-student", "--model", tiny, "--port", "0", env={"FAIR_THREADS": "1"})
    try:
        line = child.wait_for("serving", 120)
        url, port = URL.search(line).groups()  # type: ignore[union-attr]
        assert int(port) > 0 and url.endswith("/v1")
        assert tiny in _scrape(url + "/models") or "data" in _scrape(url + "/models")
        assert "fair_student" in _scrape(f"http://127.0.0.1:{port}/metrics")
    finally:
        assert child.stop() in (0, -15)
