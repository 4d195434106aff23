"""Round 2 as one command: ``fair run`` serves the trained adapter itself.

With ``[student] adapter = "runs/train/adapter"`` the run starts ``fair serve-student`` (a child
process through ``engine.services``: stopped at the end, on errors, Ctrl-C and SIGTERM) at the
student endpoint's own loopback ``host:port``, serving the adapter under the endpoint's ``model``
name, so every attempt of the run is recorded against that adapter. ``[student] server`` picks
the backend: ``cpu``, ``vllm`` (``vllm serve``; exit 2 with an install hint when absent) or
``auto`` (vllm when the ``vllm`` command is installed). The engine itself never imports torch:
the server is another process.
"""

from __future__ import annotations

import contextlib
import shlex
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

from fairdistill.engine.config import RunConfig, endpoint_address
from fairdistill.engine.errors import ConfigError, UsageError
from fairdistill.engine.services import Services

STARTUP_TIMEOUT_S = 900.0  # loading the model (and vLLM's warm-up) can take minutes


def serve_argv(cfg: RunConfig) -> list[str]:
    """``fair serve-student ...`` for the run's adapter (paths made absolute)."""
    student = cfg.student
    assert student.adapter is not None
    host, port = endpoint_address(cfg)
    name = cfg.endpoints[student.endpoint].model
    argv = ["serve-student", "--adapter", f"{name}={Path(student.adapter).resolve()}"]
    if student.model:
        model = Path(student.model)
        argv += ["--model", str(model.resolve()) if model.exists() else student.model]
    return [*argv, "--host", host, "--port", str(port), "--backend", student.server]


def _check(cfg: RunConfig) -> None:
    adapter = Path(cfg.student.adapter or "")
    if not (adapter / "adapter_config.json").is_file():
        raise ConfigError(f"student.adapter: {adapter} is not a LoRA adapter folder (no adapter_config.json)")
    host, port = endpoint_address(cfg)
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is no owner
        try:
            s.bind((host, port))
        except OSError as exc:
            raise UsageError(
                f"student.adapter: cannot serve the student on {host}:{port} ({exc.strerror}); stop what "
                f"listens there or change endpoints.{cfg.student.endpoint}.base_url"
            ) from None


@contextlib.contextmanager
def student_server(cfg: RunConfig, log_dir: Path) -> Iterator[None]:
    """Serve ``student.adapter`` for the duration of the block (nothing when it is unset)."""
    if cfg.student.adapter is None:
        yield
        return
    _check(cfg)
    argv = serve_argv(cfg)
    base_url = cfg.endpoints[cfg.student.endpoint].base_url.rstrip("/")
    print(f"fair run: starting the student: fair {shlex.join(argv)}", file=sys.stderr, flush=True)
    with Services(log_dir) as services:
        try:
            services.start("student-server", argv, f"{base_url}/models", STARTUP_TIMEOUT_S, grace=30.0)
        except (RuntimeError, TimeoutError) as exc:
            tail = _tail(Path(log_dir) / "student-server.log")
            raise UsageError(f"the student server did not start: {exc}{tail}") from None
        yield
    print("fair run: student server stopped", file=sys.stderr, flush=True)


def _tail(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return f" (last line: {lines[-1].strip()[:300]})" if lines else ""
