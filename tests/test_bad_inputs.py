"""Bad input never crashes a run (issue 10): a corpus of bad configs, input lines, server replies,
command lines and damaged run directories, each through the real ``fair`` entry point.

Every case asserts the exit code, that no traceback is printed, that the message names the field
or ``file:line``, and that the good records are there exactly once. ``engine.cli.main`` runs
in-process (in a thread, with a deadline) against real loopback servers: ``tests/fakeserver.py``
sends the hostile bytes, the simulator serves ``fair run``. Reply cases share one run per
provider (one hostile body per input line), so the whole file stays fast.
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
import tomli_w

from fairdistill.engine.cli import main
from fairdistill.engine.rundir.store import iter_raw, shard_paths
from fairdistill.engine.sim import ModelProfile, SimProfile
from fairdistill.engine.sim.server import SimThread
from tests.fakeserver import FakeServerThread, Seen, raw, write_input

# -- running `fair` in-process -------------------------------------------------------------------


@dataclass
class Result:
    rc: int
    err: str

    def lines(self) -> list[str]:
        return [ln for ln in self.err.splitlines() if ln.strip()]


_run_lock = threading.Lock()  # stderr is process-wide: one in-process `fair` at a time


def fair(*argv: str, deadline: float = 60.0, env: dict[str, str] | None = None) -> Result:
    """``fair ARGV`` through ``engine.cli.main`` in a thread; fails the test if it hangs."""
    buf = io.StringIO()
    box: dict[str, int] = {}

    def target() -> None:
        with contextlib.redirect_stderr(buf), contextlib.redirect_stdout(buf):
            box["rc"] = main(list(argv))

    with _run_lock, _env(env or {}):
        t = threading.Thread(target=target, daemon=True)
        t.start()
        t.join(deadline)
    assert not t.is_alive(), f"`fair {' '.join(argv[:2])}` still running after {deadline}s: {buf.getvalue()}"
    return Result(box["rc"], buf.getvalue())


@contextlib.contextmanager
def _env(extra: dict[str, str]):
    old = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def clean(res: Result) -> None:
    """No traceback, nothing but ``fair...`` lines from us, no raw control bytes."""
    assert "Traceback" not in res.err, res.err
    assert not any(c in res.err for c in "\x1b\x07\x00\r"), repr(res.err)


def one_error(res: Result, code: int, *needles: str) -> str:
    """Exit ``code`` with exactly one line on stderr that contains every needle."""
    clean(res)
    assert res.rc == code, res.err
    lines = res.lines()
    assert len(lines) == 1, res.err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def responses(out: Path) -> dict[str, dict]:
    rows = list(iter_raw(out, "responses"))
    by_id = {r["id"]: r for r in rows}
    assert len(by_id) == len(rows), "a record was written twice"
    return by_id


# =================================================================================================
# 1. config: range-checked fields, cross-field rules, the file itself
# =================================================================================================


def base_config() -> dict:
    ep = {"base_url": "http://127.0.0.1:9/v1", "model": "m"}
    return {
        "student": {"endpoint": "s"},
        "teachers": {"endpoints": ["a", "b"]},
        "endpoints": {"s": dict(ep), "a": dict(ep), "b": dict(ep)},
    }


NAN, INF = float("nan"), float("inf")
CONFIG_CASES = [  # (section path, key, value, text the error must contain)
    (("run",), "max_in_flight", 0, "run.max_in_flight"),
    (("run",), "max_in_flight", -1, "run.max_in_flight"),
    (("run",), "max_in_flight", "many", "run.max_in_flight"),
    (("run",), "max_in_flight", 10**9, "run.max_in_flight"),
    (("run",), "breaker_window", 0, "run.breaker_window"),
    (("run",), "breaker_rate", 1.5, "run.breaker_rate"),
    (("run",), "breaker_rate", 0.0, "run.breaker_rate"),
    (("run",), "breaker_rate", NAN, "run.breaker_rate"),
    (("run",), "shard_records", 0, "run.shard_records"),
    (("run",), "seed", "x", "run.seed"),
    (("run",), "seed", INF, "run.seed"),
    (("run",), "sead", 1, "sead"),
    (("student",), "attempts", 0, "student.attempts"),
    (("student",), "attempts", -3, "student.attempts"),
    (("student",), "attempts", 1000, "student.attempts"),
    (("student",), "temperature", -0.1, "student.temperature"),
    (("student",), "temperature", 3.0, "student.temperature"),
    (("student",), "temperature", NAN, "student.temperature"),
    (("student",), "max_tokens", 0, "student.max_tokens"),
    (("student",), "max_tokens", -1, "student.max_tokens"),
    (("student",), "max_tokens", 10**11, "student.max_tokens"),
    (("student",), "endpoint", "nope", "student.endpoint"),
    (("teachers",), "temperature", INF, "teachers.temperature"),
    (("teachers",), "max_tokens", 0, "teachers.max_tokens"),
    (("teachers",), "review_max_tokens", -5, "teachers.review_max_tokens"),
    (("teachers",), "endpoints", ["a"], "teachers.endpoints"),
    (("teachers",), "endpoints", ["a", "a"], "teachers.endpoints"),
    (("teachers",), "endpoints", ["a", "zz"], "teachers.endpoints"),
    (("teachers",), "endpoints", "a", "teachers.endpoints"),
    (("review",), "threshold", 0.5, "review.threshold"),
    (("review",), "threshold", 5.0, "review.threshold"),
    (("review",), "threshold", 6, "review.threshold"),
    (("review",), "threshold", -1, "review.threshold"),
    (("review",), "threshold", NAN, "review.threshold"),
    (("review",), "threshold", INF, "review.threshold"),
    (("review",), "threshold", "high", "review.threshold"),
    (("review",), "min_valid", 0, "review.min_valid"),
    (("review",), "min_valid", 2, "review.min_valid"),  # 2 teachers: 1 reviewer per rationale
    (("review",), "gold_check", "maybe", "review.gold_check"),
    (("review",), "aggregation", "max", "review.aggregation"),
    (("review",), "early_stop", "yes", "review.early_stop"),
    (("endpoints", "a"), "base_url", "localhost:8000/v1", "base_url"),
    (("endpoints", "a"), "base_url", "ftp://host/v1", "base_url"),
    (("endpoints", "a"), "base_url", "", "base_url"),
    (("endpoints", "a"), "base_url", "http://", "base_url"),
    (("endpoints", "a"), "base_url", "http://host name/v1", "base_url"),
    (("endpoints", "a"), "model", "", "model"),
    (("endpoints", "a"), "price_in", -1.0, "price_in"),
    (("endpoints", "a"), "price_out", -0.01, "price_out"),
    (("endpoints", "a"), "price_in", INF, "price_in"),
    (("endpoints", "a"), "concurrency", 0, "concurrency"),
    (("endpoints", "a"), "concurrency", -1, "concurrency"),
    (("endpoints", "a"), "rpm", 0, "rpm"),
    (("endpoints", "a"), "rpm", -5, "rpm"),
    (("endpoints", "a"), "tpm", NAN, "tpm"),
    (("endpoints", "a"), "timeout_s", 0, "timeout_s"),
    (("endpoints", "a"), "timeout_s", -1, "timeout_s"),
    (("endpoints", "a"), "timeout_s", 1e9, "timeout_s"),
    (("endpoints", "a"), "max_attempts", 0, "max_attempts"),
    (("endpoints", "a"), "max_attempts", 1000, "max_attempts"),
    (("endpoints", "a"), "max_wait_s", 0, "max_wait_s"),
    (("endpoints", "a"), "provider", "azure", "provider"),
    (("endpoints", "a"), "headers", {"x": 1}, "headers"),
    ((), "prompts", "v99", "prompts"),
    (("dataset",), "offset", -1, "dataset.offset"),
    (("dataset",), "limit", -1, "dataset.limit"),
    (("dataset",), "task", "essay", "dataset.task"),
    (("samples",), "policy", "some", "samples.policy"),
    ((), "extra_table", {"a": 1}, "extra_table"),
    ((), "endpoints", 5, "endpoints"),
    # second corpus (QA pass): fields added since, URL ports, header injection, 64-bit seeds
    (("run",), "seed", 10**20, "run.seed"),  # sent to servers as a 64-bit int
    (("run",), "max_cost_usd", -1.0, "run.max_cost_usd"),
    (("run",), "max_cost_usd", 0, "run.max_cost_usd"),
    (("student",), "top_p", 0.0, "student.top_p"),
    (("student",), "top_p", 1.5, "student.top_p"),
    (("student",), "server", "gpu", "student.server"),
    (("student",), "adapter", "", "student.adapter"),
    (("student",), "model", "", "student.model"),
    (("samples",), "answer_line", 1, "samples.answer_line"),
    (("endpoints", "a"), "base_url", "http://127.0.0.1:99999/v1", "base_url"),
    (("endpoints", "a"), "base_url", "http://127.0.0.1:0/v1", "base_url"),
    (("endpoints", "a"), "base_url", "http://127.0.0.1:/v1", "base_url"),
    (("endpoints", "a"), "base_url", "http:///v1", "base_url"),
    (("endpoints", "a"), "headers", {"X-A": "a\r\nEvil: 1"}, "headers"),
    (("endpoints", "a"), "headers", {"X A:": "v"}, "headers"),
    (("endpoints", "a"), "mode", "offline", "mode"),
    (("endpoints", "a"), "batch", {"poll_s": 0}, "batch.poll_s"),
    (("endpoints", "a"), "batch", {"price_factor": 2}, "batch.price_factor"),
    (("endpoints", "a"), "batch", {"max_bytes": 10}, "batch.max_bytes"),
    (("endpoints", "a"), "batch", {"fallback": "retry"}, "batch.fallback"),
    (("endpoints", "a"), "batch", {"lingr_s": 3}, "lingr_s"),
]


@pytest.mark.parametrize(
    ("section", "key", "value", "needle"),
    CONFIG_CASES,
    ids=[f"{'.'.join(c[0] + (c[1],))}={c[2]!r}"[:60] for c in CONFIG_CASES],
)
def test_config_value(tmp_path, section, key, value, needle):
    raw_cfg = base_config()
    table = raw_cfg
    for name in section:
        table = table.setdefault(name, {})
    table[key] = value
    path = tmp_path / "job.toml"
    path.write_text(tomli_w.dumps(raw_cfg))
    res = fair("run", str(path), "--run-dir", str(tmp_path / "run"), "--no-progress")
    one_error(res, 2, str(path), needle)
    assert not (tmp_path / "run").exists(), "a bad config must stop the run before anything is written"


CONFIG_FILE_CASES = {
    "not-toml": (b"[run\nseed = 1", "not valid TOML"),
    "not-utf8": (b"[run]\nseed = 1\nname = '\xff\xfe'\n", "not valid TOML"),
    "binary": (bytes(range(256)), "not valid TOML"),
    "deep-array": (b"a = " + b"[" * 20000 + b"]" * 20000 + b"\n", "job.toml"),
    "empty": (b"", "endpoints"),
    "missing-teachers": (tomli_w.dumps({**base_config(), "teachers": {}}).encode(), "at `teachers`"),
    "nul-bytes": (b"\x00" * 64, "not valid TOML"),
}  # fmt: skip


@pytest.mark.parametrize("name", CONFIG_FILE_CASES)
def test_config_file(tmp_path, name):
    data, needle = CONFIG_FILE_CASES[name]
    path = tmp_path / "job.toml"
    path.write_bytes(data)
    one_error(fair("run", str(path), "--run-dir", str(tmp_path / "run")), 2, str(path), needle)


CONFIG_TOGETHER = {  # values that are bad only together: one validation step names them
    "batch-over-anthropic-limit": (
        {"provider": "anthropic", "mode": "batch", "batch": {"max_items": 200_000}},
        "anthropic's limit 100000",
    ),
    "batch-over-openai-limit": ({"mode": "batch", "batch": {"max_items": 60_000}}, "batch.max_items"),
    "student-adapter-not-a-folder": ({}, "student.adapter"),
}


@pytest.mark.parametrize("name", CONFIG_TOGETHER)
def test_config_values_together(tmp_path, name):
    raw_cfg = base_config()
    updates, needle = CONFIG_TOGETHER[name]
    raw_cfg["endpoints"]["a"].update(updates)
    if name.startswith("student-adapter"):
        raw_cfg["student"]["adapter"] = str(tmp_path / "no-adapter")
    path = tmp_path / "job.toml"
    path.write_text(tomli_w.dumps(raw_cfg))
    one_error(fair("run", str(path), "--run-dir", str(tmp_path / "run"), "--no-progress"), 2, needle)
    assert not (tmp_path / "run").exists()


def test_a_key_pasted_into_api_key_env_is_not_echoed(tmp_path):
    raw_cfg = base_config()
    raw_cfg["endpoints"]["a"]["api_key_env"] = "sk-proj-abcdef1234567890 secret"
    path = tmp_path / "job.toml"
    path.write_text(tomli_w.dumps(raw_cfg))
    res = fair("run", str(path), "--run-dir", str(tmp_path / "run"), "--no-progress")
    one_error(res, 2, "api_key_env")
    assert "sk-proj" not in res.err


def test_the_base_config_itself_is_valid(tmp_path):
    from fairdistill.engine.config import load_config

    path = tmp_path / "job.toml"
    path.write_text(tomli_w.dumps(base_config()))
    assert load_config(path).review.threshold == 3.0


# =================================================================================================
# 2. input files: `fair generate` input lines and dataset lines
# =================================================================================================


@pytest.fixture(scope="module")
def server():
    with FakeServerThread() as srv:
        yield srv


DEEP = b"[" * 100_000 + b"]" * 100_000
BAD_LINES = {
    "not-utf8": b"\xff\xfe garbage",
    "latin1-prompt": b'{"id": "x", "prompt": "caf\xe9"}',
    "truncated-utf8-id": b'{"id": "x\xc3", "prompt": "q"}',
    "utf8-surrogate": b'{"id": "x", "prompt": "\xed\xa0\x80"}',
    "overlong-utf8": b'{"id": "x", "prompt": "\xc0\xaf"}',
    "nul-bytes": b"\x00\x00\x00",
    "bom": b'\xef\xbb\xbf{"id": "x", "prompt": "q"}',
    "deep-prompt": b'{"id": "x", "prompt": ' + DEEP + b"}",
    "deep-unknown-field": b'{"id": "x", "prompt": "q", "extra": ' + DEEP + b"}",
    "deep-objects": b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    "deep-line": DEEP,
    "not-json": b"hello",
    "truncated": b'{"id": "x", "prompt": "q"',
    "array": b"[1, 2, 3]",
    "string": b'"just a string"',
    "number": b"42",
    "null": b"null",
    "empty-object": b"{}",
    "no-id": b'{"prompt": "q"}',
    "null-id": b'{"id": null, "prompt": "q"}',
    "empty-id": b'{"id": "", "prompt": "q"}',
    "list-id": b'{"id": ["a"], "prompt": "q"}',
    "object-id": b'{"id": {"a": 1}, "prompt": "q"}',
    "bool-id": b'{"id": true, "prompt": "q"}',
    "float-id": b'{"id": 1.5, "prompt": "q"}',
    "huge-id": b'{"id": 1e400, "prompt": "q"}',
    "no-prompt": b'{"id": "x"}',
    "null-prompt": b'{"id": "x", "prompt": null}',
    "number-prompt": b'{"id": "x", "prompt": 5}',
    "list-prompt": b'{"id": "x", "prompt": ["a"]}',
    "empty-messages": b'{"id": "x", "messages": []}',
    "string-messages": b'{"id": "x", "messages": "hi"}',
    "bad-role": b'{"id": "x", "messages": [{"role": "robot", "content": "hi"}]}',
    "no-content": b'{"id": "x", "messages": [{"role": "user"}]}',
    "number-content": b'{"id": "x", "messages": [{"role": "user", "content": 5}]}',
    "null-message": b'{"id": "x", "messages": [null]}',
    "duplicate-id": b'{"id": "g0", "prompt": "again"}',
    "duplicate-int-id": b'{"id": "g1", "prompt": "again"}',
    "id-5000-digits": b'{"id": 1' + b"0" * 5000 + b', "prompt": "q"}',
}
GOOD_IDS = ["g0", "g1", "g2", "g3"]


def generate_input(path: Path, bad: bytes) -> Path:
    """g0, g1, <bad line> (line 3), g2, g3."""
    good = [orjson.dumps({"id": i, "prompt": f"question {i}"}) for i in GOOD_IDS]
    path.write_bytes(b"\n".join([*good[:2], bad, *good[2:]]) + b"\n")
    return path


def gen(srv, inp: Path, out: Path, *extra: str, deadline: float = 60.0) -> Result:
    return fair(
        "generate", "--endpoint", srv.url, "--model", "m", "--input", str(inp), "--output", str(out),
        "--no-progress", "--no-cache", "--max-attempts", "2", "--concurrency", "8", *extra, deadline=deadline,
    )  # fmt: skip


@pytest.mark.parametrize("name", BAD_LINES)
def test_generate_input_line(server, tmp_path, name):
    inp = generate_input(tmp_path / "in.jsonl", BAD_LINES[name])
    res = gen(server, inp, tmp_path / "out")
    clean(res)
    assert res.rc == 1, res.err
    named = [ln for ln in res.lines() if f"{inp}:3" in ln]
    assert len(named) == 1 and named[0].startswith("fair: skipped input line"), res.err
    if name.startswith("duplicate"):
        assert "duplicate id" in named[0] and "first on line" in named[0]
    recs = responses(tmp_path / "out")
    assert set(recs) == set(GOOD_IDS)
    assert all(r["error"] is None and r["texts"] == [f"echo: question {r['id']}"] for r in recs.values())


ACCEPTED_LINES = {  # odd but valid: accepted, on purpose (see the report)
    "crlf": b'{"id": "x", "prompt": "q"}\r',
    "control-chars-in-id": b'{"id": "x\\u001b[31m", "prompt": "q"}',
    "int-id": b'{"id": 7, "prompt": "q"}',
    "bigint-id": b'{"id": 99999999999999999999999999, "prompt": "q"}',  # kept as its decimal string
    "unicode-prompt": '{"id": "x", "prompt": "\u00e9\u4e2d\U0001f600"}'.encode(),
}


@pytest.mark.parametrize("name", ACCEPTED_LINES)
def test_generate_accepts_odd_but_valid_lines(server, tmp_path, name):
    inp = generate_input(tmp_path / "in.jsonl", ACCEPTED_LINES[name])
    res = gen(server, inp, tmp_path / "out")
    clean(res)
    assert res.rc == 0, res.err
    assert len(responses(tmp_path / "out")) == len(GOOD_IDS) + 1


def test_generate_accepts_a_bom_at_the_start_of_the_file(server, tmp_path):
    inp = generate_input(tmp_path / "in.jsonl", b'{"id": "x", "prompt": "q"}')
    inp.write_bytes(b"\xef\xbb\xbf" + inp.read_bytes())  # as Notepad writes UTF-8
    res = gen(server, inp, tmp_path / "out")
    clean(res)
    assert res.rc == 0 and sorted(responses(tmp_path / "out")) == sorted([*GOOD_IDS, "x"]), res.err


# -- dataset lines, through `fair run` against the simulator ---------------------------------------

TEACHERS = ["t1", "t2", "t3"]
QUESTIONS = {
    f"d{i}": (f"Ann has {i + 3} pens and buys {2 * i + 1} more. How many pens?", str(3 * i + 4))
    for i in range(3)
}


@pytest.fixture(scope="module")
def sim():
    from fairdistill.engine.rundir.schema import Problem

    probs = [
        Problem(id=k, question=q, answer=a, task="numeric", dataset="t") for k, (q, a) in QUESTIONS.items()
    ]
    models = {t: ModelProfile(content="reasoning", skill=0.9, leniency=0.3) for t in TEACHERS}
    models["student"] = ModelProfile(content="reasoning", role="student", skill=0.4)
    with SimThread(SimProfile(name="t", seed=7, models=models), probs) as s:
        yield s


def job(tmp_path: Path, base_url: str, data: Path, **sections) -> Path:
    eps = {
        n: {"base_url": base_url, "model": n, "max_attempts": 2, "timeout_s": 10}
        for n in [*TEACHERS, "student"]
    }
    raw_cfg = {
        "run": {"seed": 3, "max_in_flight": 8},
        "dataset": {"name": "jsonl", "path": str(data), "task": "numeric"},
        "student": {"endpoint": "student", "attempts": 2, "temperature": 0.7},
        "teachers": {"endpoints": TEACHERS},
        "endpoints": eps,
    }  # fmt: skip
    for k, v in sections.items():
        raw_cfg.setdefault(k, {}).update(v)
    path = tmp_path / "job.toml"
    path.write_text(tomli_w.dumps(raw_cfg))
    return path


def dataset_file(path: Path, bad: bytes) -> Path:
    good = [orjson.dumps({"id": k, "question": q, "answer": a}) for k, (q, a) in QUESTIONS.items()]
    path.write_bytes(b"\n".join([good[0], bad, *good[1:]]) + b"\n")  # the bad line is line 2
    return path


BAD_DATASET_LINES = {
    "not-utf8": b'{"id": "x", "question": "\xff\xfe", "answer": "1"}',
    "latin1": b'{"id": "x", "question": "caf\xe9", "answer": "1"}',
    "deep": b'{"id": "x", "question": ' + DEEP + b', "answer": "1"}',
    "deep-line": DEEP,
    "not-json": b"hello",
    "array": b"[1]",
    "no-answer": b'{"id": "x", "question": "q"}',
    "no-question": b'{"id": "x", "answer": "1"}',
    "number-question": b'{"id": "x", "question": 5, "answer": "1"}',
    "bad-answer": b'{"id": "x", "question": "q", "answer": "lots"}',
    "duplicate-id": b'{"id": "d1", "question": "q", "answer": "1"}',
    "nul-bytes": b"\x00\x00",
    "answer-5000-digits": b'{"id": "x", "question": "q", "answer": 1' + b"0" * 5000 + b"}",
    "answer-object": b'{"id": "x", "question": "q", "answer": {"v": 1}}',
    "empty-question": b'{"id": "x", "question": "", "answer": "1"}',
    "trailing-garbage": b'{"id": "x", "question": "q", "answer": "1"} xx',
}


@pytest.mark.parametrize("name", BAD_DATASET_LINES)
def test_dataset_line(sim, tmp_path, name):
    data = dataset_file(tmp_path / "data.jsonl", BAD_DATASET_LINES[name])
    run_dir = tmp_path / "run"
    res = fair("run", str(job(tmp_path, sim.base_url, data)), "--run-dir", str(run_dir), "--no-progress")
    clean(res)
    assert res.rc == 0, res.err
    where = f"{data}:2" if name != "duplicate-id" else f"{data}:3"  # a duplicate is the later line
    named = [ln for ln in res.lines() if where in ln]
    assert len(named) == 1 and named[0].startswith("fair: skipped input"), res.err
    done = [r["id"] for r in iter_raw(run_dir, "problems")]
    assert sorted(done) == sorted(QUESTIONS)


NAMED_DATASETS = {  # (folder, file, good items, the bad item, `file:line` the skip names)
    "gsm8k-no-final-line": ("gsm8k", "train.jsonl", "jsonl", {"question": "q", "answer": "no marker"}, 3),
    "gsm8k-gold-not-a-number": ("gsm8k", "train.jsonl", "jsonl", {"question": "q", "answer": "#### lots"}, 3),
    "svamp-answer-text": ("svamp", "SVAMP.json", "array", {"ID": "chal-9", "Body": "b", "Question": "q",
                                                          "Answer": "seven"}, 4),
    "strategyqa-answer-maybe": ("strategyqa", "train.json", "array", {"qid": "s9", "question": "q?",
                                                                     "answer": "maybe"}, 4),
}  # fmt: skip
NAMED_GOOD = {
    "gsm8k": [{"question": QUESTIONS[k][0], "answer": f"x\n#### {QUESTIONS[k][1]}"} for k in ("d0", "d1")],
    "svamp": [{"ID": f"chal-{i}", "Body": "Ann has pens.", "Question": QUESTIONS[k][0],
               "Answer": float(QUESTIONS[k][1])} for i, k in enumerate(("d0", "d1"))],
    "strategyqa": [{"qid": f"s{i}", "question": f"Is {i} even?", "answer": i % 2 == 0} for i in range(2)],
}  # fmt: skip


@pytest.mark.parametrize("name", NAMED_DATASETS)
def test_named_dataset_item(sim, tmp_path, name):
    """The gsm8k / svamp / strategyqa readers (not only jsonl) skip a bad item naming file:line."""
    folder, file, shape, bad, line = NAMED_DATASETS[name]
    items = [*NAMED_GOOD[folder], bad]
    (tmp_path / folder).mkdir()
    path = tmp_path / folder / file
    if shape == "jsonl":
        path.write_bytes(b"\n".join(orjson.dumps(i) for i in items) + b"\n")
    else:  # one item a line: [\n item,\n item\n]
        path.write_bytes(b"[\n" + b",\n".join(orjson.dumps(i) for i in items) + b"\n]\n")
    split = "all" if folder == "svamp" else "train"  # svamp's "train" is a seeded 70 % of the items
    cfg = job(tmp_path, sim.base_url, path, dataset={"name": folder, "path": str(tmp_path), "split": split})
    run_dir = tmp_path / "run"
    res = fair("run", str(cfg), "--run-dir", str(run_dir), "--no-progress")
    clean(res)
    assert res.rc == 0, res.err
    named = [ln for ln in res.lines() if f"{path}:{line}" in ln]
    assert len(named) == 1 and named[0].startswith("fair: skipped input"), res.err
    assert len(list(iter_raw(run_dir, "problems"))) == 2


# =================================================================================================
# 3. hostile replies: one run per provider, one hostile body per input line
# =================================================================================================

U64 = str(2**64).encode()
OK_OPENAI = b'{"choices": [{"message": {"content": "x"}, "finish_reason": "stop"}]'  # + the rest, + "}"
OK_ANTHROPIC = b'{"content": [{"type": "text", "text": "x"}]'
OK_GEMINI = b'{"candidates": [{"content": {"parts": [{"text": "x"}]}}]'
LONG = b"a" * 5000
HOSTILE = {
    "openai": {
        "empty-body": b"",
        "not-json": b"not json",
        "html": b"<html><body>502 Bad Gateway</body></html>",
        "array": b"[]",
        "string": b'"ok"',
        "number": b"42",
        "null": b"null",
        "true": b"true",
        "no-choices": b"{}",
        "empty-choices": b'{"choices": []}',
        "null-choices": b'{"choices": null}',
        "string-choices": b'{"choices": "x"}',
        "choice-without-message": b'{"choices": [{}]}',
        "null-message": b'{"choices": [{"message": null, "finish_reason": "stop"}]}',
        "message-without-content": b'{"choices": [{"message": {}}]}',
        "null-content-stop": b'{"choices": [{"message": {"content": null}, "finish_reason": "stop"}]}',
        "number-content": b'{"choices": [{"message": {"content": 5}}]}',
        "list-content": b'{"choices": [{"message": {"content": ["a"]}}]}',
        "string-message": b'{"choices": [{"message": "hi"}]}',
        "usage-2**64": OK_OPENAI + b', "usage": {"prompt_tokens": ' + U64 + b"}}",
        "usage-10**30": OK_OPENAI + b', "usage": {"completion_tokens": 1000000000000000000000000000000}}',
        "usage-negative": OK_OPENAI + b', "usage": {"prompt_tokens": -5}}',
        "usage-1e400": OK_OPENAI + b', "usage": {"prompt_tokens": 1e400}}',
        "usage-float": OK_OPENAI + b', "usage": {"prompt_tokens": 1.5}}',
        "usage-string": OK_OPENAI + b', "usage": {"prompt_tokens": "12"}}',
        "usage-nan": OK_OPENAI + b', "usage": {"prompt_tokens": NaN}}',
        "usage-list": OK_OPENAI + b', "usage": [1, 2]}',
        "deep-extra-field": OK_OPENAI + b', "x": ' + DEEP + b"}",
        "deep-body": DEEP,
        "deep-content": b'{"choices": [{"message": {"content": ' + DEEP + b"}}]}",
        "not-utf8-content": b'{"choices": [{"message": {"content": "\xff\xfe"}}]}',
        "huge-finish-reason": b'{"choices": [{"message": {"content": "x"}, "finish_reason": "' + LONG + b'"}]}',  # noqa: E501
        "too-many-choices": b'{"choices": [' + b",".join([b'{"message": {"content": "x"}}'] * 1000) + b"]}",
        "truncated": b'{"choices": [{"message": {"content": "x"',
        "model-number": OK_OPENAI + b', "model": 5}',
        "nul-bytes": b"\x00" * 32,
    },
    "anthropic": {
        "empty-object": b"{}",
        "null-content": b'{"content": null}',
        "empty-content-end-turn": b'{"content": [], "stop_reason": "end_turn"}',
        "block-without-text": b'{"content": [{"type": "text"}], "stop_reason": "end_turn"}',
        "number-text": b'{"content": [{"type": "text", "text": 5}]}',
        "string-content": b'{"content": "hi"}',
        "usage-2**64": OK_ANTHROPIC + b', "usage": {"input_tokens": ' + U64 + b"}}",
        "usage-negative": OK_ANTHROPIC + b', "usage": {"output_tokens": -1}}',
        "deep": b'{"content": ' + DEEP + b"}",
        "array": b"[]",
        "stop-reason-number": b'{"content": [{"type": "text", "text": "x"}], "stop_reason": 5}',
        "only-tool-use": b'{"content": [{"type": "tool_use", "id": "t"}], "stop_reason": "end_turn"}',
    },
    "gemini": {
        "empty-object": b"{}",
        "empty-candidates": b'{"candidates": []}',
        "candidate-without-content": b'{"candidates": [{}]}',
        "no-parts-stop": b'{"candidates": [{"content": {"parts": []}, "finishReason": "STOP"}]}',
        "number-text": b'{"candidates": [{"content": {"parts": [{"text": 5}]}}]}',
        "only-thoughts": b'{"candidates": [{"content": {"parts": [{"text": "hm", "thought": true}]}}]}',
        "usage-2**64": OK_GEMINI + b', "usageMetadata": {"promptTokenCount": ' + U64 + b"}}",
        "usage-negative": OK_GEMINI + b', "usageMetadata": {"candidatesTokenCount": -3}}',
        "deep": b'{"candidates": [' + DEEP + b"]}",
        "null-candidates": b'{"candidates": null}',
        "array": b"[1]",
        "parts-string": b'{"candidates": [{"content": {"parts": "x"}}]}',
    },
}  # fmt: skip
REPLY_CASES = [(p, name) for p, cases in HOSTILE.items() for name in cases]


def prompt(seen: Seen) -> str:
    """The last message of a request, whatever its protocol (the fake server adds ``messages``)."""
    return (seen.body or {}).get("messages", [{}])[-1].get("content", "")


@dataclass
class ReplyRun:
    res: Result
    recs: dict[str, dict]
    seen: list[Seen]
    out: Path


@pytest.fixture(scope="module")
def reply_runs(tmp_path_factory) -> dict[str, ReplyRun]:
    """One `fair generate` per provider: 4 good lines and one line per hostile body, the server
    answering each hostile line's every attempt with its body."""
    runs = {}
    for provider, cases in HOSTILE.items():
        tmp = tmp_path_factory.mktemp(f"replies-{provider}")
        names = list(cases)
        inp = tmp / "in.jsonl"
        lines = [orjson.dumps({"id": i, "prompt": f"question {i}"}) for i in GOOD_IDS]
        lines += [orjson.dumps({"id": f"h-{n}", "prompt": f"hostile {n}"}) for n in names]
        inp.write_bytes(b"\n".join(lines) + b"\n")

        def rule(seen: Seen, cases=cases) -> tuple | None:
            text = prompt(seen)
            if text.startswith("hostile "):
                return raw(cases[text.removeprefix("hostile ")])
            return None

        with FakeServerThread(rule=rule) as srv:
            res = gen(srv, inp, tmp / "out", "--provider", provider, "--concurrency", "32", deadline=90)
            seen = list(srv.seen)
        runs[provider] = ReplyRun(res, responses(tmp / "out"), seen, tmp / "out")
    return runs


@pytest.mark.parametrize(("provider", "name"), REPLY_CASES, ids=[f"{p}-{n}" for p, n in REPLY_CASES])
def test_hostile_reply(reply_runs, provider, name):
    run = reply_runs[provider]
    clean(run.res)
    assert run.res.rc == 1, run.res.err  # failed records: exit 1, not a crash (70) or a hang
    rec = run.recs[f"h-{name}"]  # a record, exactly once (responses() checks), never an empty success
    assert rec["error"] and "gave up after 2 attempts" in rec["error"], rec
    assert "unusable reply" in rec["error"] or "no " in rec["error"], rec["error"]
    assert rec["texts"] == [] and len(rec["error"]) < 1000
    tries = [s for s in run.seen if prompt(s) == f"hostile {name}"]
    assert len(tries) == 2, "a malformed reply is retried, then the record fails"
    for g in GOOD_IDS:
        assert run.recs[g]["error"] is None and run.recs[g]["texts"] == [f"echo: question {g}"]
    manifest = orjson.loads((run.out / "manifest.json").read_bytes())
    assert manifest["counts"]["responses"] == len(GOOD_IDS) + len(HOSTILE[provider])


# -- server-given durations: every one clamped ---------------------------------------------------

DURATIONS = {
    "retry-after-inf": {"retry-after": "inf"},
    "retry-after-huge": {"retry-after": "1e308"},
    "retry-after-digits": {"retry-after": "9" * 400},
    "retry-after-negative": {"retry-after": "-5"},
    "retry-after-nan": {"retry-after": "nan"},
    "retry-after-far-date": {"retry-after": "Fri, 31 Dec 9999 23:59:59 GMT"},
    "retry-after-past-date": {"retry-after": "Mon, 01 Jan 1900 00:00:00 GMT"},
    "retry-after-garbage": {"retry-after": "soon\u00e9"},
    "retry-after-ms-inf": {"retry-after-ms": "inf"},
    "retry-after-ms-huge": {"retry-after-ms": "1e20"},
    "retry-after-ms-negative": {"retry-after-ms": "-1"},
    "reset-requests-huge": {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "99999999h"},
    "reset-tokens-inf": {"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "infs"},
    "remaining-negative": {"x-ratelimit-remaining-requests": "-1", "x-ratelimit-limit-requests": "nan"},
    "remaining-zero-alone": {"x-ratelimit-remaining-tokens": "0"},
    "limit-tiny": {"x-ratelimit-remaining-requests": "0", "x-ratelimit-limit-requests": "1e-9"},
    "remaining-huge": {"x-ratelimit-remaining-requests": "1e400", "x-ratelimit-limit-requests": "1e400"},
}


@pytest.mark.parametrize("name", DURATIONS)
def test_server_durations_are_clamped(tmp_path, name):
    first: set[str] = set()

    def rule(seen: Seen) -> tuple | None:
        key = str(seen.body)
        if key not in first:  # every line's first call: 429 with the hostile header
            first.add(key)
            return raw(b'{"error": {"message": "slow down"}}', 429, DURATIONS[name])
        return None

    inp = write_input(tmp_path / "in.jsonl", 4)
    with FakeServerThread(rule=rule) as srv:
        t0 = time.monotonic()
        res = gen(srv, inp, tmp_path / "out", "--max-wait", "0.5", deadline=40)
        elapsed = time.monotonic() - t0
    clean(res)
    assert res.rc == 0, res.err
    assert sorted(responses(tmp_path / "out")) == [f"r{i}" for i in range(4)]
    assert elapsed < 30, f"a server-given pause was not clamped ({elapsed:.1f}s)"


@pytest.mark.parametrize("retry_after", ["0", "-99999999"])
def test_repeated_429s_with_no_pause_after_successes(tmp_path, retry_after):
    """One line's first calls are refused with a zero (or negative: clamped to zero) Retry-After
    after others went through: admission blocks and probes (it divided by that zero once)."""
    refused: list[Seen] = []

    def rule(seen: Seen) -> tuple | None:
        if "'question 3'" in str(seen.body) and len(refused) < 3:
            refused.append(seen)
            return raw(b'{"error": {"message": "slow down"}}', 429, {"retry-after": retry_after})
        return None

    inp = write_input(tmp_path / "in.jsonl", 4)
    with FakeServerThread(rule=rule) as srv:
        res = gen(srv, inp, tmp_path / "out", "--concurrency", "1", deadline=30)
    clean(res)
    assert res.rc == 0, res.err
    assert len(refused) == 3
    assert all(r["error"] is None for r in responses(tmp_path / "out").values())
    assert sorted(responses(tmp_path / "out")) == [f"r{i}" for i in range(4)]


def test_anthropic_reset_in_the_far_future_is_clamped(tmp_path):
    hdr = {
        "anthropic-ratelimit-requests-remaining": "0",
        "anthropic-ratelimit-requests-reset": "9999-12-31T23:59:59Z",
    }
    calls = []

    def rule(seen: Seen) -> tuple | None:
        calls.append(seen)
        return raw(b'{"error": {"message": "slow"}}', 429, hdr) if len(calls) == 1 else None

    inp = write_input(tmp_path / "in.jsonl", 3)
    with FakeServerThread(rule=rule) as srv:
        res = gen(srv, inp, tmp_path / "out", "--provider", "anthropic", "--max-wait", "0.5", deadline=40)
    clean(res)
    assert res.rc == 0 and len(responses(tmp_path / "out")) == 3, res.err


# -- error bodies echoed to the terminal: sanitized and cut ----------------------------------------

ECHOES = {
    "ansi-json": (400, orjson.dumps({"error": {"message": "\x1b[2J\x1b[31mpwned\x07\r\nline two"}})),
    "ansi-text": (400, b"\x1b]0;title\x07plain text error\r\n\x00"),
    "long-json": (400, orjson.dumps({"error": {"message": "A" * 50_000}})),
    "long-text": (422, b"B" * 100_000),
    "bidi": (400, orjson.dumps({"error": "safe\u202eevil\u2066"})),
    "not-utf8": (400, b"\xff\xfe\xfd error"),
    "deep-json": (400, b'{"error": ' + DEEP + b"}"),
    "deep-json-5xx": (500, b'{"error": ' + DEEP + b"}"),
}


@pytest.fixture(scope="module")
def echo_run(tmp_path_factory) -> tuple[Result, dict[str, dict]]:
    tmp = tmp_path_factory.mktemp("echo")
    inp = tmp / "in.jsonl"
    lines = [orjson.dumps({"id": i, "prompt": f"question {i}"}) for i in GOOD_IDS]
    lines += [orjson.dumps({"id": f"e-{n}", "prompt": f"echo {n}!"}) for n in ECHOES]
    inp.write_bytes(b"\n".join(lines) + b"\n")

    def rule(seen: Seen) -> tuple | None:
        for n, (status, body) in ECHOES.items():
            if f"echo {n}!" in str(seen.body):
                return raw(body, status)
        return None

    with FakeServerThread(rule=rule) as srv:
        res = gen(srv, inp, tmp / "out", "--max-attempts", "1")
    return res, responses(tmp / "out")


@pytest.mark.parametrize("name", ECHOES)
def test_error_bodies_are_sanitized(echo_run, name):
    res, recs = echo_run
    clean(res)
    assert res.rc == 1
    rec = recs[f"e-{name}"]
    assert rec["error"] and len(rec["error"]) < 600, rec["error"]
    assert not any(c in rec["error"] for c in "\x1b\x07\x00\r\n\u202e\u2066")
    shown = [ln for ln in res.lines() if f"e-{name}:" in ln]
    assert len(shown) == 1 and len(shown[0]) < 700, res.err
    assert all(recs[g]["error"] is None for g in GOOD_IDS)


# =================================================================================================
# 4. command lines and the file system
# =================================================================================================


def gen_argv(endpoint: str = "http://127.0.0.1:9/v1", model: str = "m") -> list[str]:
    return ["generate", "--endpoint", endpoint, "--model", model, "--input", "in.jsonl", "--output", "o"]


GEN = gen_argv()
FLAG_CASES = {
    "max-tokens-negative": ([*GEN, "--max-tokens", "-1"], "--max-tokens"),
    "max-tokens-zero": ([*GEN, "--max-tokens", "0"], "--max-tokens"),
    "max-tokens-text": ([*GEN, "--max-tokens", "lots"], "--max-tokens"),
    "concurrency-zero": ([*GEN, "--concurrency", "0"], "--concurrency"),
    "concurrency-negative": ([*GEN, "--concurrency", "-1"], "--concurrency"),
    "concurrency-huge": ([*GEN, "--concurrency", "1000000000"], "--concurrency"),
    "rpm-zero": ([*GEN, "--rpm", "0"], "--rpm"),
    "rpm-nan": ([*GEN, "--rpm", "nan"], "--rpm"),
    "tpm-negative": ([*GEN, "--tpm", "-10"], "--tpm"),
    "temperature-negative": ([*GEN, "--temperature", "-1"], "--temperature"),
    "temperature-inf": ([*GEN, "--temperature", "inf"], "--temperature"),
    "timeout-zero": ([*GEN, "--timeout", "0"], "--timeout"),
    "timeout-inf": ([*GEN, "--timeout", "inf"], "--timeout"),
    "max-attempts-zero": ([*GEN, "--max-attempts", "0"], "--max-attempts"),
    "max-wait-negative": ([*GEN, "--max-wait", "-1"], "--max-wait"),
    "n-zero": ([*GEN, "--n", "0"], "--n"),
    "n-huge": ([*GEN, "--n", "100000"], "--n"),
    "seed-text": ([*GEN, "--seed", "abc"], "--seed"),
    "provider-unknown": ([*GEN, "--provider", "azure"], "--provider"),
    "endpoint-no-scheme": (gen_argv(endpoint="localhost:8000/v1"), "--endpoint"),
    "endpoint-empty": (gen_argv(endpoint=""), "--endpoint"),
    "endpoint-space": (gen_argv(endpoint="http://a b/v1"), "--endpoint"),
    "model-empty": (gen_argv(model=""), "--model"),
    "generate-missing-input": (["generate", "--endpoint", "http://h/v1", "--model", "m"], "--input"),
    "sim-port-99999": (["sim", "--port", "99999"], "--port"),
    "sim-port-negative": (["sim", "--port", "-1"], "--port"),
    "sim-port-text": (["sim", "--port", "http"], "--port"),
    "serve-student-port": (["serve-student", "--port", "70000"], "--port"),
    "serve-student-max-batch": (["serve-student", "--max-batch", "0"], "--max-batch"),
    "train-max-steps": (["train", "r", "--max-steps", "0"], "--max-steps"),
    "train-lr-negative": (["train", "r", "--lr", "-0.1"], "--lr"),
    "train-lr-zero": (["train", "r", "--lr", "0"], "--lr"),
    "train-epochs": (["train", "r", "--epochs", "0"], "--epochs"),
    "train-batch-size": (["train", "r", "--batch-size", "0"], "--batch-size"),
    "train-alpha": (["train", "r", "--alpha", "-1"], "--alpha"),
    "train-lora-rank": (["train", "r", "--lora-rank", "-4"], "--lora-rank"),
    "eval-limit": (["eval", "--limit", "0"], "--limit"),
    "eval-batch-size": (["eval", "--batch-size", "-2"], "--batch-size"),
    "eval-max-new-tokens": (["eval", "--max-new-tokens", "0"], "--max-new-tokens"),
    "demo-problems": (["demo", "--problems", "0"], "--problems"),
    "export-format": (["export", "r", "--format", "csv"], "--format"),
    "unknown-command": (["frobnicate"], "frobnicate"),
    "seed-beyond-64-bit": ([*GEN, "--seed", str(10**20)], "--seed"),
    "endpoint-port-99999": (gen_argv(endpoint="http://127.0.0.1:99999/v1"), "--endpoint"),
    "price-in-negative": ([*GEN, "--price-in", "-1"], "--price-in"),
    "batch-over-anthropic-limit": (
        [*GEN, "--mode", "batch", "--provider", "anthropic", "--batch-max-items", "200000"],
        "batch.max_items",
    ),
    "batch-over-the-limit": ([*GEN, "--mode", "batch", "--batch-max-items", "900000"], "batch.max_items"),
    "batch-poll-zero": ([*GEN, "--mode", "batch", "--batch-poll", "0"], "--batch-poll"),
    "workers-without-ray": ([*GEN, "--workers", "2"], "--workers"),
    "loop-unknown": ([*GEN, "--loop", "trio"], "--loop"),
    "train-seed-beyond-64-bit": (["train", "r", "--seed", str(2**64)], "--seed"),
    "serve-student-gpu-memory": (["serve-student", "--gpu-memory-utilization", "2"], "--gpu-memory"),
    "run-metrics-port": (["run", "job.toml", "--metrics-port", "70000"], "--metrics-port"),
    "run-pilot-zero": (["run", "job.toml", "--estimate", "--pilot", "0"], "--pilot"),
    "batches-unknown-action": (["batches", "delete", "r"], "action"),
    "sim-host-unresolvable": (["sim", "--host", "no-such-host.invalid", "--port", "0"], "--host"),
    "no-command": ([], "command"),
}  # fmt: skip


@pytest.mark.parametrize("name", FLAG_CASES)
def test_command_line(name):
    argv, needle = FLAG_CASES[name]
    line = one_error(fair(*argv), 2, needle)
    assert line.startswith("fair")


# -- paths -----------------------------------------------------------------------------------------


def _good_input(tmp_path: Path) -> Path:
    return write_input(tmp_path / "in.jsonl", 3)


def _gen_to(tmp_path: Path, out: str | Path, inp: Path | None = None) -> Result:
    return fair(*GEN[:5], "--input", str(inp or _good_input(tmp_path)), "--output", str(out), "--no-progress")


def test_output_is_an_existing_file(tmp_path):
    (tmp_path / "out").write_text("x")
    one_error(_gen_to(tmp_path, tmp_path / "out"), 2, "--output", "is a file")
    assert (tmp_path / "out").read_text() == "x"


def test_output_under_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    one_error(_gen_to(tmp_path, tmp_path / "f" / "out"), 2, "--output", "is a file")


def test_output_not_writable(tmp_path):
    one_error(_gen_to(tmp_path, "/proc/fair-test/out"), 2, "/proc/fair-test")


def test_input_missing(tmp_path):
    one_error(_gen_to(tmp_path, tmp_path / "out", tmp_path / "nope.jsonl"), 2, "nope.jsonl")


def test_input_is_a_directory(tmp_path):
    one_error(_gen_to(tmp_path, tmp_path / "out", tmp_path), 2, "--input")


def test_run_dir_is_an_existing_file(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text(tomli_w.dumps(base_config()))
    (tmp_path / "run").write_text("x")
    one_error(fair("run", str(path), "--run-dir", str(tmp_path / "run")), 2, "--run-dir", "is a file")


def test_run_dir_under_a_file(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text(tomli_w.dumps(base_config()))
    (tmp_path / "f").write_text("x")
    one_error(fair("run", str(path), "--run-dir", str(tmp_path / "f" / "run")), 2, "--run-dir")


def test_config_path_is_a_directory(tmp_path):
    one_error(fair("run", str(tmp_path)), 2, str(tmp_path), "is a directory")


def test_config_path_missing(tmp_path):
    one_error(fair("run", str(tmp_path / "nope.toml")), 2, "nope.toml", "no such config file")


@pytest.mark.parametrize("cmd", ["status", "export", "repair"])
def test_run_dir_missing(tmp_path, cmd):
    extra = ["--format", "trl"] if cmd == "export" else []
    one_error(fair(cmd, str(tmp_path / "nope"), *extra), 2, "nope")


@pytest.mark.parametrize("what", ["missing", "empty", "file"])
def test_train_on_a_missing_or_empty_run_dir(tmp_path, what):
    target = tmp_path / "run"
    if what == "empty":
        target.mkdir()
    elif what == "file":
        target.write_text("x")
    line = one_error(fair("train", str(target), "--out", str(tmp_path / "t")), 2, str(target))
    assert ("no samples" in line) if what == "empty" else ("no such run directory" in line)


@pytest.mark.parametrize("cmd", ["repair", "status"])
def test_a_folder_that_is_no_run(tmp_path, cmd):
    one_error(fair(cmd, str(tmp_path)), 2, "not a run directory")


@pytest.mark.parametrize("cmd", ["serve-student", "eval"])
def test_an_adapter_folder_without_adapter_config_fails_before_loading(tmp_path, cmd):
    """Named at once, not after minutes of loading the base model (then a peft traceback)."""
    (tmp_path / "ad").mkdir()
    extra = ["--port", "0"] if cmd == "serve-student" else ["--out", str(tmp_path / "e"), "--no-base"]
    t0 = time.monotonic()
    res = fair(cmd, "--adapter", f"x={tmp_path / 'ad'}", *extra)
    clean(res)  # eval may first note that the folder has no training record (its overlap check)
    assert res.rc == 2 and "adapter_config.json" in res.lines()[-1] and str(tmp_path) in res.lines()[-1]
    assert time.monotonic() - t0 < 30


# -- damaged run directories -----------------------------------------------------------------------


@pytest.fixture
def finished_generate(server, tmp_path) -> Path:
    out = tmp_path / "out"
    res = gen(server, write_input(tmp_path / "in.jsonl", 6), out)
    assert res.rc == 0, res.err
    return out


def _damage_line(path: Path, n: int, junk: bytes) -> None:
    lines = path.read_bytes().split(b"\n")
    lines[n - 1] = junk
    path.write_bytes(b"\n".join(lines))


DAMAGE = {
    "garbage": b"\x00\x00garbage",
    "not-utf8": b'{"id": "r1\xff"}',
    "truncated-json": b'{"id": "r1", "texts": [',
    "array": b"[1, 2]",
    "no-id": b'{"texts": []}',
    "deep": DEEP,
}


@pytest.mark.parametrize("junk", DAMAGE)
@pytest.mark.parametrize("cmd", ["resume", "status"])
def test_damaged_shard_line_names_file_line_and_repair(server, finished_generate, tmp_path, cmd, junk):
    out = finished_generate
    shard = shard_paths(out, "responses")[0]
    _damage_line(shard, 3, DAMAGE[junk])
    res = gen(server, tmp_path / "in.jsonl", out) if cmd == "resume" else fair("status", str(out))
    one_error(res, 2, f"{shard}:3", f"fair repair {out}")


@pytest.mark.parametrize("junk", [b"{not json", b"[]", b"", b"\xff\xfe"])
def test_damaged_manifest_names_it(finished_generate, junk):
    (finished_generate / "manifest.json").write_bytes(junk)
    one_error(fair("status", str(finished_generate)), 2, "manifest.json:", "fair repair")


def _shard_is_a_directory(out: Path) -> str:
    shard = shard_paths(out, "responses")[0]
    shard.unlink()
    shard.mkdir()
    return str(shard)


def _manifest_is_a_directory(out: Path) -> str:
    (out / "manifest.json").unlink()
    (out / "manifest.json").mkdir()
    return "manifest.json"


DAMAGED_FILES = {
    "shard-is-a-directory": _shard_is_a_directory,
    "manifest-is-a-directory": _manifest_is_a_directory,
}


@pytest.mark.parametrize("what", DAMAGED_FILES)
@pytest.mark.parametrize("cmd", ["resume", "status"])
def test_a_directory_where_a_file_goes(server, finished_generate, tmp_path, cmd, what):
    out = finished_generate
    needle = DAMAGED_FILES[what](out)
    res = gen(server, tmp_path / "in.jsonl", out) if cmd == "resume" else fair("status", str(out))
    one_error(res, 2, needle)


def test_a_shard_the_manifest_lists_but_is_gone(server, finished_generate):
    out = finished_generate
    shard = shard_paths(out, "responses")[0]
    shard.unlink()
    one_error(fair("status", str(out)), 2, "manifest.json", shard.name, f"fair repair {out}")
    res = fair("repair", str(out))
    clean(res)
    assert res.rc == 0, res.err
    assert fair("status", str(out)).rc == 0


def test_an_unreadable_cache_is_moved_aside(server, finished_generate, tmp_path):
    out = finished_generate
    before = responses(out)
    (out / "cache.sqlite").write_bytes(b"not a database" * 100)
    argv = ["--endpoint", server.url, "--input", str(tmp_path / "in.jsonl"), "--output", str(out)]
    res = fair("generate", "--model", "m", "--no-progress", *argv)  # with its cache (gen() has none)
    clean(res)
    assert res.rc == 0, res.err
    assert any("unreadable cache" in ln and "moved to cache.sqlite.damaged-" in ln for ln in res.lines())
    assert list(out.glob("cache.sqlite.damaged-*")) and responses(out) == before


def test_repair_then_resume_restores_every_record(server, finished_generate, tmp_path):
    out = finished_generate
    before = responses(out)
    shard = shard_paths(out, "responses")[0]
    _damage_line(shard, 2, b"\x00\x00 torn by a disk")
    _damage_line(shard, 5, b'{"id": "r4", "te')
    (out / "manifest.json").write_bytes(b"{")
    res = fair("repair", str(out))
    clean(res)
    assert res.rc == 0 and f"{shard.relative_to(out)}:2" in res.err and "2 lines quarantined" in res.err
    quarantined = (out / "quarantine" / "responses" / (shard.name + ".lines")).read_bytes()
    assert quarantined == b"\x00\x00 torn by a disk\n" + b'{"id": "r4", "te\n'
    manifest = orjson.loads((out / "manifest.json").read_bytes())
    assert manifest["counts"]["responses"] == len(before) - 2
    assert fair("status", str(out)).rc == 0
    res = gen(server, tmp_path / "in.jsonl", out)
    assert res.rc == 0, res.err
    after = responses(out)
    assert set(after) == set(before)
    assert {k: v["texts"] for k, v in after.items()} == {k: v["texts"] for k, v in before.items()}


# -- the top-level handler: a bug is one line and a log file ---------------------------------------


def _boom(args) -> int:
    raise KeyError("a bug, not a user error")


@pytest.mark.parametrize("debug", [False, True])
def test_an_unexpected_exception_is_one_line_and_a_log(tmp_path, monkeypatch, debug):
    from fairdistill import engine

    monkeypatch.setitem(engine.cli.HANDLERS, "status", "tests.test_bad_inputs:_boom")
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache"), "FAIR_DEBUG": "1" if debug else "0"}
    res = fair("status", "x", env=env)
    assert res.rc == 70
    last = res.lines()[-1]
    assert last.startswith("fair: internal error: KeyError")
    logs = list((tmp_path / "cache" / "fair" / "logs").glob("crash-*.log"))
    if debug:
        assert "Traceback" in res.err and not logs
    else:
        assert "Traceback" not in res.err and len(res.lines()) == 1
        assert len(logs) == 1 and str(logs[0]) in last
        assert "Traceback" in logs[0].read_text() and "_boom" in logs[0].read_text()


# -- `fair repair` round trip on a FAIR run -------------------------------------------------------

PIPELINE_KINDS = ["attempts", "rationales", "feedback", "reviews", "samples", "failures", "problems"]


def _all_records(run_dir: Path) -> dict[str, dict[str, dict]]:
    """Every record of a run by kind and id (``calls`` left out: a redone problem's calls are
    cache hits, which that field does not count)."""
    out: dict[str, dict[str, dict]] = {}
    for kind in PIPELINE_KINDS:
        rows = list(iter_raw(run_dir, kind))
        out[kind] = {r["id"]: {k: v for k, v in r.items() if k != "calls"} for r in rows}
        assert len(out[kind]) == len(rows), f"duplicate {kind} records"
    return out


def _tear(path: Path, n: int, keep: float, fill: bytes = b"\x00") -> bytes:
    """Tear line ``n``: keep its first ``keep`` share, fill the rest (a torn or zeroed write)."""
    lines = path.read_bytes().split(b"\n")
    old = lines[n - 1]
    cut = int(len(old) * keep)
    lines[n - 1] = old[:cut] + fill * (len(old) - cut)
    path.write_bytes(b"\n".join(lines))
    return old


def test_repair_round_trip_on_a_fair_run(tmp_path):
    from fairdistill.engine.rundir.schema import Problem

    probs = [
        Problem(id=f"p{i:02d}", question=f"Tom has {i + 2} apples and gets {i + 5} more. How many?",
                answer=str(2 * i + 7), task="numeric", dataset="t")
        for i in range(24)
    ]  # fmt: skip
    data = tmp_path / "data.jsonl"
    data.write_bytes(
        b"".join(
            orjson.dumps({"id": p.id, "question": p.question, "answer": p.answer}) + b"\n" for p in probs
        )
    )
    models = {t: ModelProfile(content="reasoning", skill=0.8, leniency=0.2) for t in TEACHERS}
    models["student"] = ModelProfile(content="reasoning", role="student", skill=0.4)
    with SimThread(SimProfile(name="rt", seed=11, models=models), probs) as sim:
        cfg = job(tmp_path, sim.base_url, data, run={"shard_records": 10})
        ref, damaged = tmp_path / "ref", tmp_path / "damaged"
        for d in (ref, damaged):
            assert fair("run", str(cfg), "--run-dir", str(d), "--no-progress", deadline=120).rc == 0
        expected = _all_records(ref)
        assert _all_records(damaged) == expected and expected["samples"], (
            "the two runs must agree to begin with"
        )

        # damage the middle shard of three kinds, in the middle of it
        torn = {}
        for kind in ("rationales", "samples", "problems"):
            shards = shard_paths(damaged, kind)
            shard = shards[len(shards) // 2]
            n = len(shard.read_bytes().splitlines()) // 2 + 1
            torn[kind] = (shard, n, _tear(shard, n, keep=0.4))
        first = torn["problems"]  # status names the first damaged line it meets, in kind order
        one_error(fair("status", str(damaged)), 2, f"{first[0]}:{first[1]}", f"fair repair {damaged}")

        res = fair("repair", str(damaged))
        clean(res)
        assert res.rc == 0, res.err
        for kind, (shard, n, old) in torn.items():
            assert f"{shard.relative_to(damaged)}:{n}:" in res.err
            quarantined = (damaged / "quarantine" / kind / (shard.name + ".lines")).read_bytes()
            assert old[: int(len(old) * 0.4)] in quarantined  # kept, not deleted
        assert fair("status", str(damaged)).rc in (0, 1)  # readable again
        assert _all_records(damaged) != expected  # the torn records are missing until the resume

        res = fair("run", str(cfg), "--run-dir", str(damaged), "--no-progress", deadline=120)
        clean(res)
        assert res.rc == 0, res.err
    assert _all_records(damaged) == expected


def test_sim_on_a_port_in_use(server):
    port = server.url.split(":")[2].split("/")[0]
    one_error(fair("sim", "--port", port, "--profile", "fast", deadline=30), 2, "address already in use")
