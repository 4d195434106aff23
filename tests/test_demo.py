"""`fair demo`, the README's first command, run for real as a subprocess (small and fast here:
the simulated student and a few problems; `fair demo` itself uses SmolLM2 and all of them)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fakeserver import fair

from fairdistill.engine.rundir.store import iter_raw


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")


@pytest.mark.slow
async def test_demo_runs_the_whole_job_and_reports_it(tmp_path):
    """Pipeline, LoRA training and base-vs-trained evaluation end to end; the report's figures
    are those of the run directory."""
    out = tmp_path / "demo"
    args = ["--sim-student", "--problems", "12", "--train-steps", "1", "--out", str(out)]
    rc, _, err = await fair("demo", *args)
    assert rc == 0, err[-3000:]
    report = (out / "report.md").read_text()
    assert "problems done | 9 / 9" in report  # 12 built-in problems, every fourth held back
    accepted = [r for r in iter_raw(out / "run", "rationales") if r["status"] == "accepted"]
    assert f"rationales accepted | {len(accepted)} |" in report
    samples = sum(1 for _ in iter_raw(out / "run", "samples"))
    assert samples > 0 and (out / "train" / "adapter").is_dir()
    assert re.search(r"\| fair \| [\d.]+ % \[", report)  # the trained adapter was evaluated
    assert re.search(r"\| base \| [\d.]+ % \[", report)
    assert "None" not in report.split("## Training")[1].split("## Held-back")[0]
    for line in ("report:", "run directory:", "trained adapter:"):
        assert line in err


def test_demo_stops_every_server_on_ctrl_c_and_sigterm(tmp_path):
    for sig in (signal.SIGINT, signal.SIGTERM):
        out = tmp_path / sig.name
        proc = subprocess.Popen(
            [sys.executable, "-m", "fairdistill", "demo", "--sim-student", "--out", str(out)],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
        )
        children: list[int] = []
        try:
            deadline = time.monotonic() + 120
            for line in proc.stderr:  # wait until the job is under way: the servers are up
                if "FAIR job" in line:
                    break
                assert time.monotonic() < deadline, "the demo never reached its FAIR job"
            time.sleep(1.0)
            children = _children(proc.pid)
            assert children, "the demo should have started the simulator"
            proc.send_signal(sig)
            proc.communicate(timeout=60)
            assert proc.returncode == 130, sig.name
            gone = time.monotonic() + 15
            while any(map(_alive, children)) and time.monotonic() < gone:
                time.sleep(0.2)
            assert not any(map(_alive, children)), f"a server outlived the demo after {sig.name}"
        finally:  # never leave a process behind, even when the test fails
            proc.kill()
            for pid in children:  # each server leads its own session
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
