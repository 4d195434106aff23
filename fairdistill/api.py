"""``generate`` / ``agenerate``, ``run`` / ``arun`` and ``Config``: the engine and the FAIR job from
Python, with the same validation, run directory and resume rules as the ``fair`` command.

The examples below run against the simulator: ``fair sim --profile committee --dataset builtin``
listening at ``sim_url`` (``"http://127.0.0.1:8900/v1"`` by default; the test suite starts one
on a free port and runs every example).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import orjson

from fairdistill._loop import run_sync
from fairdistill.engine.config import EndpointConfig, RunConfig, check_output_dir, convert_config, load_config
from fairdistill.engine.errors import ConfigError
from fairdistill.engine.options import GenerateOptions, RequestOptions
from fairdistill.engine.rundir.schema import Response
from fairdistill.engine.rundir.store import iter_records

Inputs = str | os.PathLike | Iterable[str | Mapping[str, Any]]


class Config:
    """A ``fair run`` config from Python values: the TOML file's tables as keyword arguments,
    checked by the same rules with the same messages (``ConfigError`` naming the field).

    Returns the validated ``RunConfig`` (``engine.config``); ``Config.load(path)`` reads a TOML file.

    >>> cfg = Config(
    ...     endpoints={
    ...         "student": {"base_url": sim_url, "model": "student-sim"},
    ...         "gpt-sim": {"base_url": sim_url, "model": "gpt-sim"},
    ...         "claude-sim": {"base_url": sim_url, "model": "claude-sim"},
    ...     },
    ...     student={"endpoint": "student"},
    ...     teachers={"endpoints": ["gpt-sim", "claude-sim"]},
    ...     dataset={"name": "builtin", "limit": 3},
    ... )
    >>> cfg.review.threshold
    3.0
    >>> Config(endpoints={}, student={"endpoint": "x"}, teachers={"endpoints": []})
    Traceback (most recent call last):
    fairdistill.engine.errors.ConfigError: fairdistill.Config: student.endpoint 'x' is not in [endpoints]
    """

    def __new__(cls, **tables: Any) -> RunConfig:  # type: ignore[misc]
        return convert_config(msgspec.to_builtins(tables), RunConfig, source="fairdistill.Config")

    @staticmethod
    def load(path: str | os.PathLike) -> RunConfig:
        """Read and check a TOML config file (errors name the file and the field)."""
        return load_config(path)


@dataclass(frozen=True)
class Run:
    """A finished ``run``: its run directory and the summary the manifest holds."""

    run_dir: Path
    summary: dict[str, Any]

    def read(self, kind: str = "samples"):
        """The run's records of ``kind`` (see ``fairdistill.read``)."""
        from fairdistill.records import read

        return read(self.run_dir, kind)


def run(config: RunConfig | str | os.PathLike, run_dir: str | os.PathLike | None = None, *,
        progress: bool = False) -> Run:  # fmt: skip
    """Run a FAIR job (a ``Config`` or a TOML path) into ``run_dir``, as ``fair run`` does: an
    existing run directory is resumed, and nothing already paid is paid again. Blocks until done;
    inside a running event loop (Jupyter) it runs in a worker thread.

    >>> names = ("student-sim", "gpt-sim", "claude-sim")
    >>> job = run(Config(
    ...     endpoints={n: {"base_url": sim_url, "model": n} for n in names},
    ...     student={"endpoint": "student-sim"},
    ...     teachers={"endpoints": ["gpt-sim", "claude-sim"]},
    ...     dataset={"name": "builtin", "limit": 4},
    ... ), tmp / "job")
    >>> job.summary["status"], len(job.summary["failed_problems"])
    ('done', 0)
    >>> sorted({s.task for s in job.read("samples")}) <= ["mistake", "rationale"]
    True
    """
    return run_sync(lambda: arun(config, run_dir, progress=progress))


async def arun(config: RunConfig | str | os.PathLike, run_dir: str | os.PathLike | None = None, *,
               progress: bool = False) -> Run:  # fmt: skip
    """``run`` as a coroutine, for code that already runs an event loop."""
    from fairdistill.engine.launch.run import run_config

    cfg = config if isinstance(config, RunConfig) else load_config(config)
    default = Path("runs") / (Path(config).stem if not isinstance(config, RunConfig) else "job")
    out = check_output_dir(Path(run_dir) if run_dir is not None else default, "run_dir")
    summary = await run_config(cfg, out, progress=progress)  # round 2: serves [student] adapter, if set
    return Run(out, summary)


def generate(inputs: Inputs, *, base_url: str, model: str, output: str | os.PathLike | None = None,
             progress: bool = False, **options: Any) -> list[Response]:  # fmt: skip
    """One chat completion per input, as ``fair generate`` does; the records in input order.

    ``inputs``: a JSONL path (``{"id", "messages"}`` or ``{"id", "prompt"}`` lines), or an
    iterable of prompts (``str``) or such dicts (a missing ``id`` is the position). ``output``: a
    run directory to keep (rerunning resumes it, paying nothing twice); default: a temporary one.
    ``options``: the endpoint's fields (``provider``, ``api_key_env``, ``concurrency``, ``rpm``,
    ``price_in``...) and the request's (``max_tokens``, ``temperature``, ``n``, ``seed``, ``cache``).

    >>> records = generate(["What is 2 + 3?", "Name a prime."], base_url=sim_url, model="gpt-sim")
    >>> [(r.id, r.error is None, len(r.texts)) for r in records]
    [('0', True, 1), ('1', True, 1)]
    >>> generate(["hi"], base_url=sim_url, model="gpt-sim", concurrency=0)
    Traceback (most recent call last):
    fairdistill.engine.errors.ConfigError: fairdistill.generate: Expected `int` >= 1 - at `concurrency`
    """
    return run_sync(lambda: agenerate(inputs, base_url=base_url, model=model, output=output,
                                      progress=progress, **options))  # fmt: skip


REQUEST_OPTIONS = ("max_tokens", "temperature", "n", "seed", "cache")


async def agenerate(inputs: Inputs, *, base_url: str, model: str, output: str | os.PathLike | None = None,
                    progress: bool = False, **options: Any) -> list[Response]:  # fmt: skip
    """``generate`` as a coroutine (``await fairdistill.agenerate(...)`` in a notebook)."""
    from fairdistill.engine.launch.generate import generate_run

    request = {k: options.pop(k) for k in REQUEST_OPTIONS if k in options}
    cache = request.pop("cache", True)
    fields = {"base_url": base_url, "model": model, "name": "default", **options}
    endpoint = convert_config(fields, EndpointConfig, source="fairdistill.generate")
    with tempfile.TemporaryDirectory(prefix="fairdistill-") as scratch:
        path, ids = _input_file(inputs, Path(scratch))
        out = check_output_dir(Path(output) if output is not None else Path(scratch) / "run", "output")
        opts = GenerateOptions(path, out, endpoint, RequestOptions(**request), cache=cache, progress=progress)
        await generate_run(opts)
        by_id = {r.id: r for r in iter_records(out, "responses", Response)}
    return [by_id[i] for i in ids if i in by_id]


def _input_file(inputs: Inputs, scratch: Path) -> tuple[Path, list[str]]:
    """A JSONL file ``fair generate`` can read, and the input ids in order."""
    if isinstance(inputs, str | os.PathLike):
        path = Path(inputs)
        if not path.is_file():
            raise ConfigError(f"fairdistill.generate: {path}: no such file (give a JSONL path or a list)")
        ids = []
        with open(path, "rb") as f:
            for line in f:
                if line.strip():
                    try:
                        ids.append(str(orjson.loads(line).get("id")))
                    except (orjson.JSONDecodeError, AttributeError):
                        continue  # fair generate names the bad line
        return path, ids
    path, ids = scratch / "inputs.jsonl", []
    with open(path, "wb") as f:
        for i, item in enumerate(inputs):
            line = {"id": str(i), "prompt": item} if isinstance(item, str) else {"id": str(i), **item}
            ids.append(str(line["id"]))
            f.write(orjson.dumps(line) + b"\n")
    return path, ids
