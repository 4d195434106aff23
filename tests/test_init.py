"""``fair init``: the starter configs load, carry the field descriptions, and the ``--sim`` one
runs as is against a real ``fair sim`` (the ``fair`` command as a subprocess)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fairdistill.engine import confdoc
from fairdistill.engine.config import load_config
from fairdistill.engine.rundir.store import read_manifest
from fairdistill.engine.services import Services, free_port

ROOT = Path(__file__).resolve().parents[1]


def fair(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fairdistill", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_the_sim_starter_runs_as_is_against_fair_sim(tmp_path: Path) -> None:
    port = free_port()
    job = tmp_path / "job.toml"
    proc = fair("init", "--sim", "--port", str(port), str(job))
    assert proc.returncode == 0, proc.stderr
    assert f"--port {port}" in job.read_text()
    with Services(tmp_path / "logs") as services:
        argv = ["sim", "--profile", "committee", "--dataset", "builtin", "--port", str(port)]
        services.start("sim", argv, f"http://127.0.0.1:{port}/health", timeout=60)
        proc = fair("run", str(job), "--run-dir", str(tmp_path / "run"), "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = read_manifest(tmp_path / "run")
    assert manifest["status"] == "done" and manifest["counts"]["problems"] == 20
    assert manifest["counts"]["samples"] > 0


@pytest.mark.parametrize("providers", ["openai,anthropic,gemini", "gemini"])
def test_provider_starters_load_and_name_keys_not_values(tmp_path: Path, providers: str) -> None:
    job = tmp_path / "job.toml"
    assert fair("init", "--providers", providers, str(job)).returncode == 0
    cfg = load_config(job)
    assert len(cfg.teachers.endpoints) >= 2  # one provider: two of its models review each other
    for name in cfg.teachers.endpoints:
        ep = cfg.endpoints[name]
        assert ep.provider in providers and ep.api_key_env.endswith("_API_KEY") and ep.price_in > 0


def test_the_comments_are_the_field_descriptions(tmp_path: Path) -> None:
    job = tmp_path / "job.toml"
    assert fair("init", str(job)).returncode == 0  # --sim is the default
    text = " ".join(line.lstrip("# ").strip() for line in job.read_text().splitlines())
    for f in confdoc.fields():
        if (f.table, f.name) not in confdoc.HIDDEN:
            assert f.description in text, f"{f.table}.{f.name}"


def test_bad_uses_are_one_line_and_exit_2(tmp_path: Path) -> None:
    job = tmp_path / "job.toml"
    job.write_text("keep me")
    proc = fair("init", str(job))
    assert proc.returncode == 2 and "exists (--force overwrites it)" in proc.stderr
    assert job.read_text() == "keep me"
    assert fair("init", "--force", str(job)).returncode == 0 and "[endpoints.student]" in job.read_text()
    proc = fair("init", "--providers", "openai,mistral", str(tmp_path / "x.toml"))
    assert proc.returncode == 2 and "unknown provider 'mistral'" in proc.stderr
    proc = fair("init", "--sim", "--providers", "openai", str(tmp_path / "y.toml"))
    assert proc.returncode == 2 and "not allowed with" in proc.stderr
    proc = fair("init", str(tmp_path / "no" / "such" / "dir" / "job.toml"))
    assert proc.returncode == 2 and "is not a directory" in proc.stderr
    for p in (proc,):
        assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
