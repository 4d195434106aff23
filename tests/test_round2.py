"""Iterative FAIR as one command per round, for real: the simulator's teachers, round 1 with the
simulated student, `fair train` of a tiny Llama (the real SmolLM2 tokenizer) on round 1's
samples, then `fair run` of a round-2 config with ``[student] adapter`` -- the run starts the CPU
student server with that adapter itself, records every attempt against it, and stops it. The
same with ``server = "vllm"`` against the stand-in ``vllm`` command (tests/vllm_standin.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import vllm_standin

from fairdistill.engine.rundir.store import iter_raw
from fairdistill.engine.services import Services, free_port

ROOT = Path(__file__).resolve().parent.parent

PROFILE = """
name = "round2-test"
seed = 0
[models.student-sim]
content = "reasoning"
role = "student"
latency_ms = 5
skill = 0.2
"""
TEACHERS = ("t1", "t2", "t3")
for _t in TEACHERS:
    PROFILE += f'[models.{_t}]\ncontent = "reasoning"\nlatency_ms = 5\nskill = 0.9\n'


def job(sim_url: str, student: str, extra_student: str = "") -> str:
    teachers = "".join(
        f'[endpoints.{t}]\nbase_url = "{sim_url}"\nmodel = "{t}"\n' for t in ("t1", "t2", "t3")
    )
    return f"""
[dataset]
name = "builtin"
limit = 6
[student]
endpoint = "student"
max_tokens = 24
{extra_student}
[teachers]
endpoints = ["t1", "t2", "t3"]
max_tokens = 256
[endpoints.student]
{student}
{teachers}
"""


def fair(*args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**(env or os.environ), "FAIR_THREADS": "2"}
    return subprocess.run(
        [sys.executable, "-m", "fairdistill", *args], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


@pytest.fixture
def sim(tmp_path: Path):
    profile = tmp_path / "profile.toml"
    profile.write_text(PROFILE)
    port = free_port()
    with Services(tmp_path / "logs") as services:
        services.start(
            "sim",
            ["sim", "--profile", str(profile), "--dataset", "builtin", "--port", str(port)],
            f"http://127.0.0.1:{port}/health",
        )
        yield f"http://127.0.0.1:{port}/v1"


@pytest.mark.slow
def test_round_two_serves_the_trained_adapter_itself(tmp_path: Path, sim: str) -> None:
    from fairdistill.trainer.model import save_tiny_student

    # round 1: the simulated student's mistakes -> samples
    r1 = tmp_path / "round1.toml"
    r1.write_text(job(sim, f'base_url = "{sim}"\nmodel = "student-sim"'))
    proc = fair("run", str(r1), "--run-dir", str(tmp_path / "run1"), "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert any(True for _ in iter_raw(tmp_path / "run1", "samples"))

    # train a LoRA adapter on them (a tiny Llama: seconds on a CPU)
    tiny = save_tiny_student(tmp_path / "tiny")
    proc = fair("train", str(tmp_path / "run1"), "--model", tiny, "--out", str(tmp_path / "train"),
                "--max-steps", "2", "--batch-size", "4", "--max-seq-len", "512", "--lora-rank", "8",
                "--no-progress")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    adapter = tmp_path / "train" / "adapter"
    assert (adapter / "adapter_config.json").is_file()

    # round 2: one command; the run serves the adapter (CPU backend) at the endpoint's port
    port = free_port()
    r2 = tmp_path / "round2.toml"
    r2.write_text(
        job(
            sim,
            f'base_url = "http://127.0.0.1:{port}/v1"\nmodel = "fair-r1"\ntimeout_s = 300',
            f'adapter = "{adapter}"\nmodel = "{tiny}"\nserver = "cpu"',
        )
    )
    proc = fair("run", str(r2), "--run-dir", str(tmp_path / "run2"), "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"fair serve-student --adapter fair-r1={adapter} --model {tiny}" in proc.stderr
    assert "student server stopped" in proc.stderr
    log = (tmp_path / "run2" / "logs" / "student-server.log").read_text()
    assert "'fair-r1']" in log and "stopped" in log  # it served the adapter, then stopped cleanly

    attempts = list(iter_raw(tmp_path / "run2", "attempts"))
    assert len(attempts) == 6 and {a["model"] for a in attempts} == {"fair-r1"}
    mistakes = {a["id"] for a in attempts if not a["correct"]}
    assert mistakes, "a 2-step tiny student should still be wrong"
    feedback = list(iter_raw(tmp_path / "run2", "feedback"))
    assert feedback and {f["attempt_id"] for f in feedback} <= mistakes
    assert {f["attempt_id"] for f in feedback} == mistakes  # every mistake explained by the teachers
    round1 = {a["model"] for a in iter_raw(tmp_path / "run1", "attempts")}
    assert round1 == {"student-sim"}
    # the report puts round 1's error types (the adapter's training runs) beside round 2's
    n1 = len({f["attempt_id"] for f in iter_raw(tmp_path / "run1", "feedback")})
    report = (tmp_path / "run2" / "report.md").read_text()
    assert f"| error type | before: run1 (n = {n1}) | this run (n = {len(mistakes)}) |" in report
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))  # nobody listens there any more


def test_round_two_config_errors_name_the_field(tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 8}')
    remote = tmp_path / "remote.toml"
    remote.write_text(job("http://127.0.0.1:9/v1", 'base_url = "https://api.example.com/v1"\nmodel = "m"',
                          f'adapter = "{adapter}"'))  # fmt: skip
    proc = fair("run", str(remote), "--run-dir", str(tmp_path / "r"))
    assert proc.returncode == 2
    assert "endpoints.student.base_url: with student.adapter the run serves the student itself" in proc.stderr

    missing = tmp_path / "missing.toml"
    port = free_port()
    missing.write_text(job("http://127.0.0.1:9/v1", f'base_url = "http://127.0.0.1:{port}/v1"\nmodel = "m"',
                           f'adapter = "{tmp_path / "nope"}"'))  # fmt: skip
    proc = fair("run", str(missing), "--run-dir", str(tmp_path / "r2"))
    assert (
        proc.returncode == 2 and "student.adapter:" in proc.stderr and "no adapter_config.json" in proc.stderr
    )

    with socket.socket() as busy:  # something already listens on the student's port
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        cfg = tmp_path / "busy.toml"
        cfg.write_text(job("http://127.0.0.1:9/v1", f'base_url = "http://127.0.0.1:{taken}/v1"\nmodel = "m"',
                           f'adapter = "{adapter}"'))  # fmt: skip
        proc = fair("run", str(cfg), "--run-dir", str(tmp_path / "r3"))
    assert proc.returncode == 2 and f"cannot serve the student on 127.0.0.1:{taken}" in proc.stderr


def test_round_two_on_vllm_serve_starts_and_stops_it(tmp_path: Path, sim: str) -> None:
    """fair run -> fair serve-student --backend vllm -> vllm serve (the stand-in): two levels of
    child processes, all stopped when the run ends."""
    import json

    env = vllm_standin.install(tmp_path / "bin", tmp_path / "vllm.json")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 8}')
    port = free_port()
    cfg = tmp_path / "round2.toml"
    cfg.write_text(
        job(
            sim,
            f'base_url = "http://127.0.0.1:{port}/v1"\nmodel = "fair-r1"',
            f'adapter = "{adapter}"\nmodel = "{model}"\nserver = "vllm"',
        )
    )
    proc = fair("run", str(cfg), "--run-dir", str(tmp_path / "run"), "--no-progress", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "vllm.json").read_text())
    assert record["argv"] == [
        "serve", str(model), "--host", "127.0.0.1", "--port", str(port), "--enable-lora",
        "--lora-modules", f"fair-r1={adapter}", "--max-lora-rank", "8", "--max-loras", "1",
    ]  # fmt: skip
    attempts = list(iter_raw(tmp_path / "run", "attempts"))
    assert len(attempts) == 6 and {a["model"] for a in attempts} == {"fair-r1"}
    assert {a["answer"] for a in attempts} == {"4"}  # what the stand-in answers
    mistakes = {a["id"] for a in attempts if not a["correct"]}
    assert mistakes and {f["attempt_id"] for f in iter_raw(tmp_path / "run", "feedback")} == mistakes
    assert (tmp_path / "vllm.json.signal").read_text() == "SIGTERM"
    try:
        os.kill(record["pid"], 0)
        alive = Path(f"/proc/{record['pid']}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except ProcessLookupError:
        alive = False
    assert not alive, "vllm serve outlived the run"

    again = fair("run", str(cfg), "--run-dir", str(tmp_path / "run"), "--no-progress", env=env)
    assert again.returncode == 0, again.stderr[-3000:]  # resumes: the server comes and goes again
    assert "student server stopped" in again.stderr
    assert len(list(iter_raw(tmp_path / "run", "attempts"))) == 6
