"""The Python API (``fairdistill``) against a real ``fair sim`` over loopback: every docstring
example runs, the calls work inside a running event loop, ``Config`` says what TOML says, and
``python -m fairdistill`` is the ``fair`` command."""

from __future__ import annotations

import asyncio
import doctest
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import fairdistill
from fairdistill.engine.config import load_config
from fairdistill.engine.errors import ConfigError
from fairdistill.engine.rundir.reader import shard_lines
from fairdistill.engine.rundir.store import shard_paths
from fairdistill.engine.services import Services, free_port

ROOT = Path(__file__).resolve().parents[1]


def calls(run_dir: Path) -> int:
    """API calls a run directory's trace records (one line each)."""
    return sum(1 for path in shard_paths(run_dir, "trace") for _ in shard_lines(run_dir, path))


@pytest.fixture(scope="module")
def sim_url(tmp_path_factory):
    port = free_port()
    with Services(tmp_path_factory.mktemp("sim-logs")) as services:
        argv = ["sim", "--profile", "committee", "--dataset", "builtin", "--port", str(port)]
        services.start("sim", argv, f"http://127.0.0.1:{port}/health", timeout=60)
        yield f"http://127.0.0.1:{port}/v1"


def test_every_docstring_example_runs_against_the_simulator(sim_url: str, tmp_path: Path) -> None:
    # in this order: api.py's run example writes the run directory records.py's examples read
    globs = {"sim_url": sim_url, "tmp": tmp_path}
    tried = 0
    for name in ("fairdistill.api", "fairdistill.records", "fairdistill"):
        result = doctest.testmod(importlib.import_module(name), extraglobs=globs, report=True)
        assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed"
        tried += result.attempted
    assert tried >= 10


async def test_generate_works_inside_a_running_event_loop(sim_url: str, tmp_path: Path) -> None:
    asyncio.get_running_loop()  # as in Jupyter: a loop runs in this thread
    out = tmp_path / "gen"
    records = fairdistill.generate(["one", "two", "three"], base_url=sim_url, model="gpt-sim", output=out)
    assert [r.id for r in records] == ["0", "1", "2"] and all(r.texts and not r.error for r in records)
    # the awaitable form, then a rerun on the same output: resumed, nothing asked again
    again = await fairdistill.agenerate(
        ["one", "two", "three"], base_url=sim_url, model="gpt-sim", output=out
    )
    assert [r.texts for r in again] == [r.texts for r in records]
    assert calls(out) == 3  # resumed: the trace has one line per API call, and none was added
    assert sorted(r.id for r in fairdistill.read(out, "responses")) == ["0", "1", "2"]


def test_generate_reads_a_jsonl_path_in_its_order(sim_url: str, tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text(
        '{"id": "b", "prompt": "x"}\n{"id": "a", "messages": [{"role": "user", "content": "y"}]}\n'
    )
    records = fairdistill.generate(src, base_url=sim_url, model="gpt-sim")
    assert [r.id for r in records] == ["b", "a"]
    with pytest.raises(ConfigError, match="no such file"):
        fairdistill.generate(tmp_path / "missing.jsonl", base_url=sim_url, model="gpt-sim")


def test_config_from_python_says_what_toml_says(tmp_path: Path) -> None:
    toml = tmp_path / "job.toml"
    toml.write_text(
        '[student]\nendpoint = "s"\n[teachers]\nendpoints = ["a", "b"]\n'
        '[endpoints.s]\nbase_url = "http://127.0.0.1:1/v1"\nmodel = "m"\nrpm = -5\n'
    )
    with pytest.raises(ConfigError) as from_toml:
        load_config(toml)
    with pytest.raises(ConfigError) as from_python:
        fairdistill.Config(
            student={"endpoint": "s"},
            teachers={"endpoints": ["a", "b"]},
            endpoints={"s": {"base_url": "http://127.0.0.1:1/v1", "model": "m", "rpm": -5}},
        )
    assert str(from_toml.value).split(": ", 1)[1] == str(from_python.value).split(": ", 1)[1]
    assert "endpoints.s" in str(from_python.value) and "rpm" in str(from_python.value)


def test_read_names_a_wrong_kind_and_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(fairdistill.UsageError, match="unknown kind 'sample'"):
        fairdistill.read(tmp_path, "sample")
    with pytest.raises(fairdistill.UsageError, match="no such run directory"):
        fairdistill.read(tmp_path / "nope", "samples")


def test_python_m_fairdistill_is_the_fair_command() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fairdistill", "--help"], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 0 and "fair run" in proc.stdout and "fair init" in proc.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "fairdistill", "nope"], capture_output=True, text=True, cwd=ROOT
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
