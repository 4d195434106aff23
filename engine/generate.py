"""``fair generate``: the engine as a plain, resumable, high-throughput generator.

One chat request per input line (``{"id": ..., "messages": [...]}`` or ``{"id": ...,
"prompt": "..."}``), one ``Response`` record per input id in ``OUTPUT/responses/``::

    OUTPUT/responses/shard-*.jsonl   one record per id (``error`` set when it failed for good)
    OUTPUT/cache.sqlite              response cache (--no-cache: none)
    OUTPUT/trace/shard-*.jsonl       one line per API call
    OUTPUT/manifest.json             counts, shards with sha256, endpoint stats, status

The input is streamed: a fixed pool of workers (as many as the endpoint's concurrency) pulls
lines one at a time, so memory stays flat over any number of lines. A record is written the
moment its answer arrives; on restart every id already written is skipped, so a run killed at
any point and started again ends with exactly the records of an uninterrupted run.

Progress is ``engine.progress`` (a rich bar, plain lines off a terminal); ``--metrics-port``
serves Prometheus metrics while it runs (``engine.request.metrics``).

A bad input line is reported as ``file:line: why`` on stderr, skipped and counted; the run goes
on. Exit code: 0 all written, 1 some records failed or lines were bad (counts on stderr),
3 aborted (credentials refused).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec

from engine.config import EndpointConfig, check_output_dir, convert_flags
from engine.errors import AbortRun, ConfigError, InputError, RequestError, one_line
from engine.progress import Progress
from engine.request.client import Engine
from engine.request.metrics import serve_engine
from engine.request.providers import redact
from engine.rundir.schema import Response
from engine.rundir.store import RunStore
from engine.types import ChatRequest, Message

ENDPOINT = "default"
KIND = "responses"
MAX_REPORTED_BAD_LINES = 20


class _Line(msgspec.Struct):
    id: str | int
    messages: tuple[Message, ...] | None = None
    prompt: str | None = None


_line_decoder = msgspec.json.Decoder(_Line)
_ROLES = frozenset({"system", "user", "assistant"})


def parse_line(raw: bytes, where: str) -> tuple[str, tuple[Message, ...]]:
    """One input line -> (id, messages). ``InputError`` naming ``where`` (file:line) if bad."""
    try:
        line = _line_decoder.decode(raw)
    except msgspec.ValidationError as exc:
        raise InputError(f"{where}: {str(exc).replace('`$.', '`')}") from None
    except msgspec.DecodeError as exc:
        raise InputError(f"{where}: not valid JSON ({exc})") from None
    except RecursionError:
        raise InputError(f"{where}: JSON nested too deeply") from None
    record_id = str(line.id)
    if not record_id:
        raise InputError(f"{where}: empty `id`")
    if line.messages is not None:
        if not line.messages:
            raise InputError(f"{where}: `messages` is empty")
        for i, m in enumerate(line.messages):
            if m.role not in _ROLES:
                raise InputError(
                    f"{where}: `messages[{i}].role` is {m.role!r}; expected system, user or assistant"
                )
        return record_id, line.messages
    if line.prompt is not None:
        return record_id, (Message("user", line.prompt),)
    raise InputError(f"{where}: needs `messages` (a list of {{role, content}}) or `prompt` (a string)")


def count_lines(path: Path) -> int:
    """Lines, counted fast (for the progress total; blank and bad lines are taken off it later)."""
    n = 0
    last = b"\n"
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            n += chunk.count(b"\n")
            last = chunk[-1:]
    return n + (last != b"\n")


class _Work:
    """The shared input stream the workers pull from, with the run's counters."""

    def __init__(self, path: Path, store: RunStore, report: bool):
        self.path = path
        self.store = store
        self.report = report
        self.bad_lines = 0
        self.duplicates = 0
        self.skipped = 0  # already written by an earlier run
        self.ok = 0
        self.failed = 0
        self.failures: list[str] = []  # first few failed ids with their reason
        self.in_flight: set[str] = set()
        self.first_line: dict[str, int] = {}  # id -> the input line it was first seen on
        self.progress: Progress | None = None
        self._lines = self._read()

    def _drop(self) -> None:
        """A line that will have no record: take it off the progress total."""
        if self.progress is not None and self.progress.total:
            self.progress.total -= 1

    def _read(self) -> Iterator[tuple[str, tuple[Message, ...]]]:
        with open(self.path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if lineno == 1:
                    raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 BOM, as some editors write
                if not raw.strip():
                    self._drop()
                    continue
                try:
                    record_id, messages = parse_line(raw, f"{self.path}:{lineno}")
                except InputError as exc:
                    self.bad_lines += 1
                    self._drop()
                    if self.report and self.bad_lines <= MAX_REPORTED_BAD_LINES:
                        print(f"fair: skipped input line: {one_line(str(exc))}", file=sys.stderr)
                    continue
                if (first := self.first_line.setdefault(record_id, lineno)) != lineno:
                    self.duplicates += 1
                    self._drop()
                    if self.report and self.duplicates <= MAX_REPORTED_BAD_LINES:
                        print(
                            f"fair: skipped input line: {self.path}:{lineno}: duplicate id "
                            f"{one_line(record_id, 80)!r} (first on line {first})",
                            file=sys.stderr,
                        )
                    continue
                if self.store.has(KIND, record_id):
                    self.skipped += 1
                    continue
                yield record_id, messages

    def next(self) -> tuple[str, tuple[Message, ...]] | None:
        return next(self._lines, None)


async def generate(
    input_path: str | Path,
    output_dir: str | Path,
    endpoint: EndpointConfig,
    *,
    max_tokens: int | None = None,
    temperature: float = 0.0,
    n: int = 1,
    seed: int | None = None,
    cache: bool = True,
    progress: bool = True,
    writer: str = "",
    metrics_port: int | None = None,
) -> dict[str, Any]:
    """Run ``fair generate`` in-process; returns the summary written to the manifest.

    Raises ``AbortRun`` (e.g. ``AuthError``) when the run must stop; records written until
    then stay, and the manifest says ``aborted``. ``metrics_port``: serve Prometheus metrics
    (``engine.request.metrics``) there while it runs.
    """
    input_path, out = Path(input_path), Path(output_dir)
    if not input_path.is_file():
        raise ConfigError(f"--input {input_path}: no such file")
    endpoint.name = endpoint.name or ENDPOINT
    store = RunStore(out, writer=writer).open([KIND])
    work = _Work(input_path, store, report=True)
    total = count_lines(input_path)
    seams: dict[str, Any] = {}
    workers = endpoint.concurrency
    if endpoint.mode == "batch":  # provider Batch API: requests wait in batches, not in admission
        from engine.request.batch.executor import BatchExecutor, Unmetered

        seams = {"executor": BatchExecutor(out), "admissions": {ENDPOINT: Unmetered()}}
        workers = max(1, min(total, endpoint.batch.max_items * endpoint.batch.max_open))
    streamed = endpoint.mode == "batch" and (n == 1 or endpoint.provider == "openai")  # else: fan-out
    engine = Engine(
        {ENDPOINT: endpoint},
        cache_path=out / "cache.sqlite" if cache else None,
        trace_dir=out / "trace",
        writer=writer,
        **seams,
    )
    status = "interrupted"
    started = time.monotonic()
    try:
        async with engine:
            bar = Progress(total, label="responses", enabled=progress)
            bar.resumed = store.count(KIND)
            if progress:
                engine.observe(bar)
            work.progress = bar
            metrics = serve_engine(engine, metrics_port)
            with bar, metrics or contextlib.nullcontext():
                try:
                    async with asyncio.TaskGroup() as tg:
                        if streamed:  # batch mode: no coroutine per waiting line (engine.request.batch.feed)
                            from engine.request.batch.feed import feed

                            req = {"max_tokens": max_tokens, "temperature": temperature, "n": n, "seed": seed}
                            tg.create_task(feed(engine, ENDPOINT, work, store, bar, KIND, **req))
                        for _ in range(0 if streamed else workers):
                            tg.create_task(
                                _worker(engine, work, store, bar, max_tokens, temperature, n, seed)
                            )
                except BaseExceptionGroup as eg:  # a worker raised: unwrap what callers catch
                    abort = eg.subgroup(AbortRun)
                    if abort is not None:
                        status = "aborted"
                        raise abort.exceptions[0] from None
                    raise
            bad = work.failed or work.bad_lines or work.duplicates
            status = "done_with_failures" if bad else "done"
    finally:
        elapsed = time.monotonic() - started
        summary = _summary(work, engine, store, status, elapsed, endpoint)
        store.close(status, {"generate": summary, "endpoints": engine.snapshot()})
    return summary


async def _worker(
    engine: Engine,
    work: _Work,
    store: RunStore,
    bar: Progress,
    max_tokens: int | None,
    temperature: float,
    n: int,
    seed: int | None,
) -> None:
    while (item := work.next()) is not None:
        record_id, messages = item
        work.in_flight.add(record_id)
        request = ChatRequest(
            messages=messages, max_tokens=max_tokens, temperature=temperature, n=n, seed=seed
        )
        try:
            done = await engine.complete(ENDPOINT, request)
        except RequestError as exc:
            record = Response(id=record_id, error=str(exc))
            work.failed += 1
            if len(work.failures) < MAX_REPORTED_BAD_LINES:
                work.failures.append(f"{record_id}: {exc}")
        else:
            record = Response(
                id=record_id,
                texts=[c.text for c in done.choices],
                finish_reasons=[c.finish_reason for c in done.choices],
                prompt_tokens=done.usage.prompt_tokens,
                completion_tokens=done.usage.completion_tokens,
            )
            work.ok += 1
        finally:
            work.in_flight.discard(record_id)
        store.write(KIND, record)
        bar.done += 1


def _summary(
    work: _Work, engine: Engine, store: RunStore, status: str, elapsed: float, endpoint: EndpointConfig
) -> dict[str, Any]:
    st = engine.stats[ENDPOINT]
    done = work.ok + work.failed
    return {
        "status": status,
        "endpoint": {"provider": endpoint.provider, "base_url": endpoint.base_url, "model": endpoint.model},
        "records": store.count(KIND),
        "ok": work.ok,
        "failed": work.failed,
        "skipped_existing": work.skipped,
        "bad_lines": work.bad_lines,
        "duplicate_ids": work.duplicates,
        "elapsed_s": round(elapsed, 3),
        "records_per_s": round(done / elapsed, 2) if elapsed > 0 else 0.0,
        "calls": st.calls,
        "cache_hits": st.cache_hits,
        "http_429": st.http_429,
        "retries": st.retries,
        "prompt_tokens": st.prompt_tokens,
        "completion_tokens": st.completion_tokens,
        "cost_usd": round(st.cost_usd, 6),
        "failures": work.failures,
        **({"batch": dict(engine.executor.stats)} if endpoint.mode == "batch" else {}),  # type: ignore[attr-defined]
    }


FLAGS = {"base_url": "--endpoint", "model": "--model", "concurrency": "--concurrency", "rpm": "--rpm",
         "tpm": "--tpm", "timeout_s": "--timeout", "max_attempts": "--max-attempts",
         "max_wait_s": "--max-wait", "price_in": "--price-in", "price_out": "--price-out", "mode": "--mode",
         "batch.linger_s": "--batch-linger", "batch.max_items": "--batch-max-items",
         "batch.max_open": "--batch-max-open", "batch.poll_s": "--batch-poll",
         "batch.max_rounds": "--batch-max-rounds", "batch.fallback": "--batch-fallback"}  # fmt: skip


def batch_flags(args: Any) -> dict[str, Any]:
    """The ``--batch-*`` flags given, as an ``[endpoints.X.batch]`` table."""
    fields = ("linger_s", "max_items", "max_open", "poll_s", "max_rounds", "fallback")
    values = {f: getattr(args, "batch_" + f.removesuffix("_s"), None) for f in fields}
    return {f: v for f, v in values.items() if v is not None}


def cli_main(args: Any) -> int:
    """``fair generate ...``: exit 0 when every line has a good record, 1 otherwise."""
    if args.api_key_env and redact(args.api_key_env) != args.api_key_env:
        # never echo it back: the value looks like a key, not the name of a variable holding one
        raise ConfigError("--api-key-env takes the NAME of an environment variable, not the key itself")
    endpoint = convert_flags(
        {
            "provider": args.provider,
            "base_url": args.endpoint,
            "model": args.model,
            "api_key_env": args.api_key_env,
            "concurrency": args.concurrency,
            "rpm": args.rpm,
            "tpm": args.tpm,
            "timeout_s": args.timeout,
            "max_attempts": args.max_attempts,
            "max_wait_s": getattr(args, "max_wait", None),
            "price_in": getattr(args, "price_in", None),
            "price_out": getattr(args, "price_out", None),
            "mode": getattr(args, "mode", None),
            "batch": batch_flags(args),
            "name": ENDPOINT,
        },
        EndpointConfig,
        command="fair generate",
        flags=FLAGS,
    )
    check_output_dir(Path(args.output), "--output")
    from engine.scale import check_args

    check_args(args)
    if getattr(args, "ray", None) is not None:  # scale-out: imports ray only now
        from engine.scale import driver

        return driver.generate(args, endpoint)
    summary = asyncio.run(
        generate(
            args.input,
            args.output,
            endpoint,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            n=args.n,
            seed=args.seed,
            cache=not args.no_cache,
            progress=not args.no_progress,
            metrics_port=getattr(args, "metrics_port", None),
        )
    )
    return report(
        summary,
        f"fair: {summary['records']} records in {os.fspath(args.output)}/responses "
        f"({summary['ok']} new ok, {summary['skipped_existing']} already there) "
        f"in {summary['elapsed_s']:.1f}s",
    )


def report(summary: dict[str, Any], line: str) -> int:
    """Print a finished generate run's failures and its one summary ``line`` (with what went
    wrong appended) to stderr; the exit code: 1 when records failed or lines were skipped."""
    for failure in summary["failures"]:
        print(f"fair: failed: {one_line(failure)}", file=sys.stderr)
    problems = []
    if summary["failed"]:
        problems.append(f"{summary['failed']} records failed (their `error` says why)")
    if summary["bad_lines"]:
        problems.append(f"{summary['bad_lines']} input lines were bad and skipped")
    if summary["duplicate_ids"]:
        problems.append(f"{summary['duplicate_ids']} input lines repeated an earlier id and were skipped")
    print(line + (f"; {'; '.join(problems)}" if problems else ""), file=sys.stderr)
    return 1 if problems else 0
