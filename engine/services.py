"""Local servers started as child processes (simulator, student, `vllm serve`), always stopped again.

Each child runs in its own session so a Ctrl-C on the terminal reaches us first; we then stop
the children ourselves (SIGTERM, then SIGKILL after a grace period), also on errors. While the
group is open a SIGTERM to us takes Ctrl-C's path (``KeyboardInterrupt``), so ``kill`` does not
orphan the children either.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from types import FrameType
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Services:
    """A group of child servers; a context manager that stops every one of them on exit."""

    def __init__(self, log_dir: Path):
        self.log_dir = Path(log_dir)
        self.procs: dict[str, subprocess.Popen] = {}
        self.graces: dict[str, float] = {}
        self._sigterm: Any = None

    def start(
        self, name: str, argv: list[str], health_url: str, timeout: float = 300.0, *, grace: float = 10.0
    ) -> None:
        """Start ``fair ARGV...`` (a ``fair`` subcommand) and wait until ``health_url`` answers 200."""
        cmd = [sys.executable, "-m", "fairdistill", *argv]
        self.start_process(name, cmd, health_url, timeout, grace=grace)

    def start_process(
        self,
        name: str,
        cmd: list[str],
        health_url: str,
        timeout: float = 300.0,
        *,
        grace: float = 10.0,
        log: bool = True,
    ) -> None:
        """Start any command and wait until ``health_url`` answers 200. Its output goes to
        ``LOG_DIR/NAME.log`` (``log=False``: to ours); ``grace`` is its time to stop on SIGTERM."""
        out: Any = None
        if log:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the child
        where = f"; see {self.log_dir / (name + '.log')}" if log else ""
        self.procs[name] = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT if log else None, start_new_session=True
        )
        self.graces[name] = grace
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs[name].poll() is not None:
                raise RuntimeError(f"{name} exited early (code {self.procs[name].returncode}){where}")
            try:
                with urllib.request.urlopen(health_url, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise TimeoutError(f"{name} did not become ready in {timeout:.0f}s{where}")

    def alive(self, name: str) -> bool:
        proc = self.procs.get(name)
        return proc is not None and proc.poll() is None

    def stop(self, name: str, grace: float | None = None) -> None:
        proc = self.procs.pop(name, None)
        grace = self.graces.pop(name, 10.0) if grace is None else grace
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def __enter__(self) -> Services:
        if threading.current_thread() is threading.main_thread():  # signal handlers live there
            self._sigterm = signal.signal(signal.SIGTERM, _interrupt)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            for name in list(self.procs):
                self.stop(name)
        finally:
            if self._sigterm is not None:
                signal.signal(signal.SIGTERM, self._sigterm)
                self._sigterm = None


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt
