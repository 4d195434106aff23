"""What a ``fair run`` / ``fair generate`` command asks for, and how it ended, as typed values.

``engine.cli`` builds one of these once from the parsed flags; the launcher (``engine.launch``),
the modes (``engine.fair.pipeline``, ``engine.generate``) and the Ray driver (``engine.scale``)
read only these fields, never an argparse namespace.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from fairdistill.engine.config import EndpointConfig
from fairdistill.engine.errors import FairError

PILOT = 20  # problems in an ``--estimate`` pilot unless ``--pilot`` says


class RayOptions(msgspec.Struct, frozen=True):
    """``--ray ADDRESS [--workers N] [--block-size N]``."""

    address: str = "local"
    workers: int | None = None
    block_size: int | None = None


class RunOptions(msgspec.Struct, frozen=True):
    """``fair run CONFIG``: where the run goes and how it is shown."""

    config: Path
    run_dir: Path
    progress: bool = True
    metrics_port: int | None = None
    estimate: bool = False
    pilot: int = PILOT
    ray: RayOptions | None = None


class RequestOptions(msgspec.Struct, frozen=True):
    """The sampling fields of every ``fair generate`` request."""

    max_tokens: int | None = None
    temperature: float = 0.0
    n: int = 1
    seed: int | None = None


class GenerateOptions(msgspec.Struct, frozen=True):
    """``fair generate``: input, output, the endpoint and the request fields."""

    input: Path
    output: Path
    endpoint: EndpointConfig
    request: RequestOptions = RequestOptions()
    cache: bool = True
    progress: bool = True
    metrics_port: int | None = None
    compress: str = "none"
    ray: RayOptions | None = None


@dataclass
class Outcome:
    """How a mode ended, for ``engine.launch.finish.finish_run``: the error to raise, the
    projection for stdout, the lines for stderr, and how many records failed (exit 1). The
    manifest and report.md are written by the mode itself, on every way out (a crash too)."""

    run_dir: Path
    status: str
    failed: int = 0
    lines: list[str] = field(default_factory=list)
    stdout: str = ""
    error: FairError | None = None
