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

A bad input line is reported as ``file:line: why`` on stderr, skipped and counted; the run goes
on. Exit code: 0 all written, 1 some records failed or lines were bad (counts on stderr),
3 aborted (credentials refused).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec

from engine.client import Engine
from engine.config import EndpointConfig
from engine.errors import AbortRun, ConfigError, InputError, RequestError
from engine.progress import Progress
from engine.providers import redact
from engine.schema import Response
from engine.store import RunStore
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
        self.progress: Progress | None = None
        self._lines = self._read()

    def _drop(self) -> None:
        """A line that will have no record: take it off the progress total."""
        if self.progress is not None and self.progress.total:
            self.progress.total -= 1

    def _read(self) -> Iterator[tuple[str, tuple[Message, ...]]]:
        with open(self.path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    self._drop()
                    continue
                try:
                    record_id, messages = parse_line(raw, f"{self.path}:{lineno}")
                except InputError as exc:
                    self.bad_lines += 1
                    self._drop()
                    if self.report and self.bad_lines <= MAX_REPORTED_BAD_LINES:
                        print(f"fair: skipped input line: {exc}", file=sys.stderr)
                    continue
                if self.store.has(KIND, record_id):
                    self.skipped += 1
                    continue
                if record_id in self.in_flight:
                    self.duplicates += 1
                    self._drop()
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
) -> dict[str, Any]:
    """Run ``fair generate`` in-process; returns the summary written to the manifest.

    Raises ``AbortRun`` (e.g. ``AuthError``) when the run must stop; records written until
    then stay, and the manifest says ``aborted``.
    """
    input_path, out = Path(input_path), Path(output_dir)
    if not input_path.is_file():
        raise ConfigError(f"--input {input_path}: no such file")
    endpoint.name = endpoint.name or ENDPOINT
    store = RunStore(out, writer=writer).open([KIND])
    work = _Work(input_path, store, report=True)
    total = count_lines(input_path)
    engine = Engine(
        {ENDPOINT: endpoint},
        cache_path=out / "cache.sqlite" if cache else None,
        trace_dir=out / "trace",
        writer=writer,
    )
    status = "interrupted"
    started = time.monotonic()
    try:
        async with engine:
            bar = Progress(total, engine.stats, label="responses", enabled=progress)
            bar.resumed = store.count(KIND)
            work.progress = bar
            async with bar:
                try:
                    async with asyncio.TaskGroup() as tg:
                        for _ in range(endpoint.concurrency):
                            tg.create_task(
                                _worker(engine, work, store, bar, max_tokens, temperature, n, seed)
                            )
                except BaseExceptionGroup as eg:  # a worker raised: unwrap what callers catch
                    abort = eg.subgroup(AbortRun)
                    if abort is not None:
                        status = "aborted"
                        raise abort.exceptions[0] from None
                    raise
            status = "done" if not (work.failed or work.bad_lines) else "done_with_failures"
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
    }


def cli_main(args: Any) -> int:
    """``fair generate ...``: exit 0 when every line has a good record, 1 otherwise."""
    if args.api_key_env and redact(args.api_key_env) != args.api_key_env:
        # never echo it back: the value looks like a key, not the name of a variable holding one
        raise ConfigError("--api-key-env takes the NAME of an environment variable, not the key itself")
    try:
        endpoint = EndpointConfig(
            provider=args.provider,
            base_url=args.endpoint,
            model=args.model,
            api_key_env=args.api_key_env,
            concurrency=args.concurrency,
            rpm=args.rpm,
            tpm=args.tpm,
            timeout_s=args.timeout,
            max_attempts=args.max_attempts,
            name=ENDPOINT,
        )
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"fair generate: {exc}") from None
    if args.n < 1:
        raise ConfigError("fair generate: --n must be >= 1")
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
        )
    )
    for line in summary["failures"]:
        print(f"fair: failed: {line}", file=sys.stderr)
    problems = []
    if summary["failed"]:
        problems.append(f"{summary['failed']} records failed (their `error` says why)")
    if summary["bad_lines"]:
        problems.append(f"{summary['bad_lines']} input lines were bad and skipped")
    line = (
        f"fair: {summary['records']} records in {os.fspath(args.output)}/responses "
        f"({summary['ok']} new ok, {summary['skipped_existing']} already there) "
        f"in {summary['elapsed_s']:.1f}s"
    )
    print(line + (f"; {'; '.join(problems)}" if problems else ""), file=sys.stderr)
    return 1 if problems else 0
